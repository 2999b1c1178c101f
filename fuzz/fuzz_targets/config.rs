//! The config parser and validator on arbitrary text: every problem comes back as an
//! `Err` with its key, never a panic (nor a hang: run with `-timeout`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match connwatch::config::Config::parse(text) {
        Ok(config) => {
            // A valid config has at least what validation promised.
            for connection in &config.connections {
                assert!(config.platforms.contains_key(&connection.platform));
            }
        }
        Err(problems) => assert!(!problems.is_empty()),
    }
});
