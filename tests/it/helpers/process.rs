//! The daemon as a real process: spawn with captured logs, signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BINARY: &str = env!("CARGO_BIN_EXE_connwatch");

/// A daemon's stderr, collected line by line as it runs.
pub type Log = Arc<Mutex<String>>;

/// A daemon process that is killed when dropped, so a failing test leaves nothing behind.
pub struct Daemon(pub std::process::Child);

impl std::ops::Deref for Daemon {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `connwatch run`, collecting stderr; returns the child, the log and the admin address.
pub fn spawn_daemon(config: &std::path::Path) -> (Daemon, Log, String) {
    let (child, log, mut addresses) = spawn_daemon_with(config, &["admin_addr="]);
    (child, log, addresses.remove(0))
}

/// Like `spawn_daemon`, waiting for each `field=` of `fields` in the log.
pub fn spawn_daemon_with(
    config: &std::path::Path,
    fields: &[&'static str],
) -> (Daemon, Log, Vec<String>) {
    let mut child = Command::new(BINARY)
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let log = Arc::new(Mutex::new(String::new()));
    let (address_sender, address_receiver) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let sink = log.clone();
    let wanted: Vec<&'static str> = fields.to_vec();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for (index, field) in wanted.iter().enumerate() {
                if let Some(position) = line.find(field) {
                    let address: String = line[position + field.len()..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    let _ = address_sender.send((index, address));
                }
            }
            let mut log = sink.lock().expect("log");
            log.push_str(&line);
            log.push('\n');
        }
    });
    let mut addresses = vec![String::new(); fields.len()];
    for _ in 0..fields.len() {
        let (index, address) = address_receiver
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("daemon did not start: {}", log.lock().expect("log")));
        addresses[index] = address;
    }
    (Daemon(child), log, addresses)
}

/// A connection's health as the daemon's admin API at `admin` reports it.
pub async fn api_health(admin: &str, id: &str) -> Option<String> {
    let detail: serde_json::Value = reqwest::get(format!("http://{admin}/api/v1/connections/{id}"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    detail["health"].as_str().map(str::to_owned)
}

pub fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

pub fn nix_kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}
