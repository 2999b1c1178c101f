//! Standard Webhooks and hex HMAC verification on arbitrary headers, body and clocks,
//! then the body parser the handler uses after a signature check.
//!
//! Input, split on the first five newlines: the secret (`whsec_…`, else its raw bytes are
//! the key), `webhook-id`, `webhook-timestamp`, `webhook-signature` (also the hex header),
//! our clock in Unix seconds (`!` before it: sign the body correctly first), the body.
#![no_main]

use connwatch::config::SignatureScheme;
use connwatch::webhook::parse_delivery;
use connwatch::webhook::verify::{
    TOLERANCE_SECS, decode_standard_secret, sign_hex, sign_standard, verify_hex, verify_standard,
};
use connwatch_fuzz::webhook_profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(6, |byte| *byte == b'\n');
    let mut next = || parts.next().unwrap_or_default();
    let (secret, id, timestamp, signatures, clock, body) =
        (next(), next(), next(), next(), next(), next());
    let text = |bytes: &[u8]| std::str::from_utf8(bytes).ok().map(str::to_owned);
    let (id, timestamp, mut signatures) = (text(id), text(timestamp), text(signatures));
    let key = text(secret)
        .and_then(|secret| decode_standard_secret(&secret).ok())
        .unwrap_or_else(|| secret.to_vec());
    let keys = vec![key.clone(), b"another key".to_vec()];
    let clock = text(clock).unwrap_or_default();
    let sign = clock.starts_with('!');
    let now: i64 = clock.trim_start_matches('!').trim().parse().unwrap_or(0);
    let signed_at = timestamp
        .as_deref()
        .and_then(|at| at.trim().parse::<i64>().ok());
    let mut hex_header = signatures.clone();
    if let (true, Some(id), Some(at)) = (sign, id.as_deref(), signed_at) {
        let signature = sign_standard(&key, id, at, body);
        signatures = Some(format!("{} {signature}", signatures.unwrap_or_default()));
        hex_header = Some(format!("sha256={}", sign_hex(&key, body)));
    }
    let standard = verify_standard(
        &keys,
        id.as_deref(),
        timestamp.as_deref(),
        signatures.as_deref(),
        body,
        now,
    );
    let hex = verify_hex(&keys, hex_header.as_deref(), body);
    if let (true, Some(_), Some(at)) = (sign, id.as_deref(), signed_at) {
        // A correct signature within the tolerance verifies; outside it never does.
        let fresh = now.abs_diff(at) <= TOLERANCE_SECS.unsigned_abs();
        assert_eq!(standard.is_ok(), fresh, "{standard:?}");
        assert!(hex.is_ok(), "{hex:?}");
    }
    for scheme in [
        SignatureScheme::Standard,
        SignatureScheme::HexHmac {
            header: "x-signature".into(),
        },
    ] {
        let profile = webhook_profile(scheme);
        let webhook_id = id.clone().unwrap_or_else(|| "msg_fuzz".into());
        if let Some(delivery) = parse_delivery(
            "makini",
            &profile,
            webhook_id,
            body,
            now.saturating_mul(1000),
        ) {
            assert!(!delivery.remote_id.is_empty());
            assert!(
                delivery.webhook_id.chars().count() <= connwatch::webhook::WEBHOOK_ID_LIMIT,
                "{}",
                delivery.webhook_id
            );
        }
    }
});
