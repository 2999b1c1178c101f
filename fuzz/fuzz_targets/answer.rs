//! Answer classification: arbitrary status, headers and body against a platform profile
//! that reads bodies (reauth pointer, error code pointer, auth failure codes) and a plain
//! one; then redaction of the token from what the platform said.
//!
//! Input, HTTP-like: the status on the first line, `Name: value` header lines, an empty
//! line, the body.
#![no_main]

use connwatch::probe::read_answer;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "tok_live_fuzz";

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|byte| *byte == b'\n');
    let status: u16 = lines
        .next()
        .and_then(|line| std::str::from_utf8(line).ok())
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or(0);
    let mut headers = HeaderMap::new();
    let mut consumed = data
        .iter()
        .position(|byte| *byte == b'\n')
        .map_or(data.len(), |at| at + 1);
    for line in lines.by_ref() {
        consumed = (consumed + line.len() + 1).min(data.len());
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|byte| *byte == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let body = &data[consumed..];
    for platform in [connwatch_fuzz::platform(), connwatch_fuzz::plain_platform()] {
        let mut report = read_answer(&platform, status, &headers, body, 12);
        assert_eq!(report.status, Some(status));
        report.redact(&[TOKEN]);
        for text in [&report.message, &report.error_code, &report.request_id]
            .into_iter()
            .flatten()
        {
            assert!(!text.contains(TOKEN), "{text:?} keeps the token");
        }
    }
});
