//! The change-feed page parser the poller uses: arbitrary JSON bytes in, the changes and
//! the next cursor out, with the example profile and one whose items are the page itself.
#![no_main]

use connwatch::poll::read_page;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(page) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let example = connwatch_fuzz::changes_profile();
    let root = connwatch::config::ChangesConfig {
        items_pointer: String::new(),
        next_pointer: "/0/next".into(),
        id_pointer: "/data/id".into(),
        updated_pointer: "/data/updated".into(),
        ..example.clone()
    };
    for profile in [&example, &root] {
        if let Ok(read) = read_page(&page, profile) {
            let items = page
                .pointer(&profile.items_pointer)
                .and_then(serde_json::Value::as_array)
                .map_or(0, Vec::len);
            assert_eq!(read.changes.len() + read.skipped, items);
            assert!(
                read.changes
                    .iter()
                    .all(|change| !change.change_id.is_empty())
            );
        }
    }
});
