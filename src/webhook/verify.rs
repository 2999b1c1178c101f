//! Signature verification of webhooks on the raw body, in constant time.
//!
//! Standard Webhooks: `HMAC-SHA256(secret, "{id}.{timestamp}.{body}")`, base64, sent as
//! one or more space-separated `v1,<signature>` values; secrets are `whsec_<base64>`.
//! Written here rather than taken from the `standardwebhooks` crate, which accepts an
//! empty secret and then verifies forged signatures.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a `webhook-timestamp` may be from our clock.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// Why a delivery's signature was refused (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A signature header is absent.
    #[error("missing signature headers")]
    Missing,
    /// The timestamp is not a number.
    #[error("malformed timestamp")]
    BadTimestamp,
    /// The timestamp is outside the tolerance (a replay, or a broken clock).
    #[error("timestamp outside the tolerance")]
    Stale,
    /// No signature matched any configured secret.
    #[error("no signature matches")]
    Mismatch,
}

/// Decodes a Standard Webhooks secret: `whsec_` + base64 of 24 to 64 bytes.
pub fn decode_standard_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("a Standard Webhooks secret starts with whsec_")?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| "the part after whsec_ is not base64".to_owned())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "the secret decodes to {} bytes; 24 to 64 are required",
            key.len()
        ));
    }
    Ok(key)
}

/// Signs like a Standard Webhooks sender: the value of one `v1,` entry.
pub fn sign_standard(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Verifies a Standard Webhooks delivery against every key; `now` in Unix seconds.
pub fn verify_standard(
    keys: &[Vec<u8>],
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(id), Some(timestamp), Some(signatures)) = (id, timestamp, signatures) else {
        return Err(SignatureError::Missing);
    };
    let timestamp: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    // `abs_diff`: a timestamp an age away (now - 2^63) must not overflow into "fresh".
    if now.abs_diff(timestamp) > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let candidates: Vec<Vec<u8>> = signatures
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .collect();
    for key in keys {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        for candidate in &candidates {
            // verify_slice compares in constant time.
            if mac.clone().verify_slice(candidate).is_ok() {
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

/// Verifies a hex HMAC-SHA256 of the raw body (an optional `sha256=` prefix is allowed).
pub fn verify_hex(
    keys: &[Vec<u8>],
    header: Option<&str>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex = header.trim().trim_start_matches("sha256=");
    let Some(presented) = decode_hex(hex) else {
        return Err(SignatureError::Mismatch);
    };
    for key in keys {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(body);
        if mac.verify_slice(&presented).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

/// Hex HMAC-SHA256 of `body` (what a hex-scheme sender puts in its header).
pub fn sign_hex(key: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn keys() -> Vec<Vec<u8>> {
        vec![decode_standard_secret(SECRET).expect("valid secret")]
    }

    fn verify(
        keys: &[Vec<u8>],
        body: &[u8],
        signature: &str,
        now: i64,
    ) -> Result<(), SignatureError> {
        verify_standard(
            keys,
            Some(ID),
            Some(&TIMESTAMP.to_string()),
            Some(signature),
            body,
            now,
        )
    }

    #[test]
    fn the_specification_example_verifies() {
        assert_eq!(sign_standard(&keys()[0], ID, TIMESTAMP, BODY), SIGNATURE);
        assert_eq!(verify(&keys(), BODY, SIGNATURE, TIMESTAMP), Ok(()));
    }

    #[test]
    fn a_timestamp_an_age_away_is_stale_not_an_overflow() {
        let now = TIMESTAMP;
        for far in [
            now.wrapping_sub(i64::MIN),
            i64::MIN,
            i64::MAX,
            now + i64::MIN,
        ] {
            assert_eq!(
                verify_standard(
                    &keys(),
                    Some(ID),
                    Some(&far.to_string()),
                    Some(SIGNATURE),
                    BODY,
                    now,
                ),
                Err(SignatureError::Stale),
                "timestamp {far}"
            );
        }
    }

    #[test]
    fn any_of_several_signatures_and_secrets_may_match() {
        let other = decode_standard_secret("whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQQ==")
            .expect("valid");
        let header = format!("v1,bm9wZQ== {SIGNATURE}");
        assert_eq!(
            verify(
                &[other.clone(), keys()[0].clone()],
                BODY,
                &header,
                TIMESTAMP
            ),
            Ok(())
        );
        assert_eq!(
            verify(&[other], BODY, SIGNATURE, TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn tampering_staleness_and_missing_headers_are_refused() {
        assert_eq!(
            verify(&keys(), br#"{"test": 2432232315}"#, SIGNATURE, TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&keys(), BODY, SIGNATURE, TIMESTAMP + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&keys(), BODY, SIGNATURE, TIMESTAMP - 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(verify(&keys(), BODY, SIGNATURE, TIMESTAMP + 299), Ok(()));
        assert_eq!(
            verify(&keys(), BODY, "v2,whatever", TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_standard(&keys(), None, Some("1"), Some(SIGNATURE), BODY, 1),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_standard(&keys(), Some(ID), Some("soon"), Some(SIGNATURE), BODY, 1),
            Err(SignatureError::BadTimestamp)
        );
    }

    #[test]
    fn short_long_and_malformed_secrets_are_refused() {
        assert!(decode_standard_secret("whsec_").is_err(), "empty");
        assert!(decode_standard_secret("whsec_c2hvcnQ=").is_err(), "5 bytes");
        assert!(decode_standard_secret(&format!("whsec_{}", STANDARD.encode([7u8; 65]))).is_err());
        assert!(
            decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err(),
            "no prefix"
        );
        assert!(decode_standard_secret("whsec_!!!").is_err(), "not base64");
    }

    #[test]
    fn hex_signatures_verify_with_or_without_prefix() {
        let key = b"a-nango-secret-of-some-length".to_vec();
        let signature = sign_hex(&key, BODY);
        assert_eq!(
            verify_hex(std::slice::from_ref(&key), Some(&signature), BODY),
            Ok(())
        );
        assert_eq!(
            verify_hex(
                std::slice::from_ref(&key),
                Some(&format!("sha256={signature}")),
                BODY
            ),
            Ok(())
        );
        assert_eq!(
            verify_hex(std::slice::from_ref(&key), Some(&signature), b"other"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify_hex(&[key], None, BODY), Err(SignatureError::Missing));
    }
}
