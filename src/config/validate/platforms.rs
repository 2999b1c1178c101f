//! `[platforms.NAME]`: how to probe each platform, and its `webhooks` and `changes` tables.

use std::collections::BTreeMap;

use crate::config::raw::{RawAuth, RawChanges, RawPlatform, RawPlatformWebhooks};
use crate::config::toml_lines::{Segment, key};
use crate::config::{ChangesConfig, PlatformConfig, PlatformWebhooks, SecretRef, SignatureScheme};
use crate::domain::decode_standard_secret;

use super::Checker;
use super::checker::{child, json_pointer};

/// Validates every `[platforms.NAME]`; a platform with a problem is left out.
pub(super) fn validate(
    checker: &mut Checker,
    value: Option<toml::Value>,
    probe_concurrency: u32,
) -> BTreeMap<String, PlatformConfig> {
    let mut platforms = BTreeMap::new();
    match value {
        Some(toml::Value::Table(entries)) => {
            // With several platforms, one hanging platform must not take every probe slot.
            let default_concurrency = if entries.len() > 1 {
                (probe_concurrency / 2).max(1)
            } else {
                probe_concurrency
            };
            for (name, value) in entries {
                let path = [key("platforms"), key(&name)];
                if let Some(raw) = checker.section::<RawPlatform>(value, &path)
                    && let Some(platform) =
                        platform(checker, &path, &name, raw, default_concurrency)
                {
                    platforms.insert(name, platform);
                }
            }
        }
        Some(_) => checker.problem(&[key("platforms")], "must be a table of [platforms.NAME]"),
        None => {}
    }
    platforms
}

fn platform(
    checker: &mut Checker,
    path: &[Segment],
    name: &str,
    raw: RawPlatform,
    default_concurrency: u32,
) -> Option<PlatformConfig> {
    let at = |leaf: &str| child(path, leaf);
    let before = checker.problems.len();
    if reqwest::Url::parse(&raw.base_url)
        .map(|url| !matches!(url.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        checker.problem(
            &at("base_url"),
            format!("{:?} is not an http(s) URL", raw.base_url),
        );
    }
    if !raw.probe.path.starts_with('/') {
        checker.problem(&at("probe"), "path must start with '/'");
    }
    let probe_method = probe_method(checker, &at("probe"), raw.probe.method);
    let (auth_header, auth_scheme) = auth(checker, &at("auth"), raw.auth);
    let reauth_pointer = json_pointer(checker, &at("reauth_pointer"), raw.reauth_pointer);
    let error_code_pointer = json_pointer(
        checker,
        &at("error_code_pointer"),
        raw.error_code_pointer
            .or_else(|| Some("/error/code".to_owned())),
    );
    let error_message_pointer = json_pointer(
        checker,
        &at("error_message_pointer"),
        raw.error_message_pointer
            .or_else(|| Some("/error/message".to_owned())),
    );
    let concurrency = checker.positive(&at("concurrency"), raw.concurrency, default_concurrency);
    if raw.rate_limit == Some(0) {
        checker.problem(&at("rate_limit"), "must be at least 1 request per second");
    }
    let webhooks = raw
        .webhooks
        .map(|webhooks| platform_webhooks(checker, &at("webhooks"), webhooks));
    let changes = raw
        .changes
        .map(|changes| self::changes(checker, &at("changes"), changes));
    (checker.problems.len() == before).then(|| PlatformConfig {
        name: name.to_owned(),
        base_url: raw.base_url.trim_end_matches('/').to_owned(),
        probe_method,
        probe_path: raw.probe.path,
        auth_header,
        auth_scheme,
        auth_failure_status: raw.auth_failure_status.unwrap_or_else(|| vec![401, 403]),
        reauth_pointer,
        reauth_values: raw.reauth_values,
        error_code_pointer,
        error_message_pointer,
        auth_failure_codes: raw.auth_failure_codes,
        request_id_header: raw.request_id_header,
        concurrency,
        rate_limit: raw.rate_limit.filter(|limit| *limit > 0),
        webhooks,
        changes,
    })
}

/// The probe's HTTP method; `GET` when unset.
fn probe_method(
    checker: &mut Checker,
    path: &[Segment],
    method: Option<String>,
) -> reqwest::Method {
    let method_text = method.unwrap_or_else(|| "GET".to_owned());
    match reqwest::Method::from_bytes(method_text.to_uppercase().as_bytes()) {
        Ok(method) => method,
        Err(_) => {
            checker.problem(path, format!("{method_text:?} is not an HTTP method"));
            reqwest::Method::GET
        }
    }
}

/// The token's header and scheme: `Authorization: Bearer` unless told otherwise.
fn auth(checker: &mut Checker, path: &[Segment], raw: Option<RawAuth>) -> (String, String) {
    let (auth_header, auth_scheme) = match raw {
        Some(auth) => (
            auth.header.unwrap_or_else(|| "Authorization".to_owned()),
            auth.scheme.unwrap_or_else(|| "Bearer".to_owned()),
        ),
        None => ("Authorization".to_owned(), "Bearer".to_owned()),
    };
    if reqwest::header::HeaderName::from_bytes(auth_header.as_bytes()).is_err() {
        checker.problem(path, format!("{auth_header:?} is not a header name"));
    }
    // A CR, LF or other control character would break the header (the probe then sends
    // no usable token: a false "needs reauthorization").
    if auth_scheme.chars().any(|c| c.is_control() || c == ' ') {
        checker.problem(
            &super::checker::child(path, "scheme"),
            format!("{auth_scheme:?} may not contain spaces or control characters"),
        );
    }
    (auth_header, auth_scheme)
}

fn platform_webhooks(
    checker: &mut Checker,
    path: &[Segment],
    raw: RawPlatformWebhooks,
) -> PlatformWebhooks {
    let at = |leaf: &str| child(path, leaf);
    let scheme = signature_scheme(checker, path, raw.scheme.as_deref(), raw.signature_header);
    if raw.secrets.is_empty() {
        checker.problem(&at("secrets"), "at least one secret is required");
    }
    for (index, secret) in raw.secrets.iter().enumerate() {
        let mut secret_path = at("secrets");
        secret_path.push(Segment::Index(index));
        check_signing_secret(checker, &secret_path, secret, &scheme);
    }
    let connection_pointer = json_pointer(
        checker,
        &at("connection_pointer"),
        Some(raw.connection_pointer),
    )
    .unwrap_or_default();
    PlatformWebhooks {
        secrets: raw.secrets,
        scheme,
        id_header: raw.id_header,
        connection_pointer,
        type_pointer: json_pointer(checker, &at("type_pointer"), raw.type_pointer),
        reauth_types: raw.reauth_types,
        reconnect_types: raw.reconnect_types,
        change_id_pointer: json_pointer(checker, &at("change_id_pointer"), raw.change_id_pointer),
        change_updated_pointer: json_pointer(
            checker,
            &at("change_updated_pointer"),
            raw.change_updated_pointer,
        ),
    }
}

/// `scheme` (Standard Webhooks by default) with the header the hex scheme needs.
fn signature_scheme(
    checker: &mut Checker,
    path: &[Segment],
    scheme: Option<&str>,
    signature_header: Option<String>,
) -> SignatureScheme {
    match scheme {
        None | Some("standard") => SignatureScheme::Standard,
        Some("hmac-sha256-hex") => match signature_header {
            Some(header) => SignatureScheme::HexHmac { header },
            None => {
                checker.problem(
                    &child(path, "signature_header"),
                    "required with scheme \"hmac-sha256-hex\"",
                );
                SignatureScheme::Standard
            }
        },
        Some(other) => {
            checker.problem(
                &child(path, "scheme"),
                format!("{other:?} is not a scheme; use \"standard\" or \"hmac-sha256-hex\""),
            );
            SignatureScheme::Standard
        }
    }
}

/// Reads one signing secret now, so a short or malformed one fails start-up.
fn check_signing_secret(
    checker: &mut Checker,
    path: &[Segment],
    secret: &SecretRef,
    scheme: &SignatureScheme,
) {
    match secret.read() {
        Ok(value) => {
            let value = secrecy::ExposeSecret::expose_secret(&value);
            let check = match scheme {
                SignatureScheme::Standard => decode_standard_secret(value).map(|_| ()),
                SignatureScheme::HexHmac { .. } if value.len() < 16 => {
                    Err("a signing secret must be at least 16 characters".to_owned())
                }
                SignatureScheme::HexHmac { .. } => Ok(()),
            };
            if let Err(message) = check {
                checker.problem(path, message);
            }
        }
        Err(error) => checker.problem(path, error.to_string()),
    }
}

fn changes(checker: &mut Checker, path: &[Segment], raw: RawChanges) -> ChangesConfig {
    let at = |leaf: &str| child(path, leaf);
    if !raw.path.starts_with('/') {
        checker.problem(&at("path"), "must start with '/'");
    }
    let mut pointer = |name: &str, raw: Option<String>, default: &str| {
        json_pointer(
            checker,
            &at(name),
            Some(raw.unwrap_or_else(|| default.to_owned())),
        )
        .unwrap_or_default()
    };
    let items_pointer = pointer("items_pointer", raw.items_pointer, "/data");
    let next_pointer = pointer("next_pointer", raw.next_pointer, "/next");
    let id_pointer = pointer("id_pointer", raw.id_pointer, "/id");
    let updated_pointer = pointer("updated_pointer", raw.updated_pointer, "/updated_at");
    ChangesConfig {
        path: raw.path,
        since_param: raw
            .since_param
            .unwrap_or_else(|| "modified_after".to_owned()),
        items_pointer,
        next_pointer,
        cursor_param: raw.cursor_param.unwrap_or_else(|| "cursor".to_owned()),
        id_pointer,
        updated_pointer,
        max_pages: checker.positive(&at("max_pages"), raw.max_pages, 1000),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::PLATFORM;
    use crate::config::parse::parse;

    #[test]
    fn a_line_break_in_the_auth_scheme_is_refused() {
        let text = "[platforms.makini]\nbase_url = \"http://127.0.0.1:1\"\n\
                    probe = { path = \"/v1/connection\" }\n\
                    auth = { scheme = \"Bearer\\r\\nX-Injected: 1\" }\n";
        let problems = crate::config::parse::parse(text).expect_err("invalid");
        assert!(
            problems
                .iter()
                .any(|problem| problem.key == "platforms.makini.auth.scheme"),
            "{problems:?}"
        );
    }

    #[test]
    fn short_or_malformed_webhook_secrets_are_refused_at_load() {
        let folder = std::env::temp_dir().join(format!("connwatch-secret-{}", std::process::id()));
        std::fs::create_dir_all(&folder).expect("folder");
        std::fs::write(folder.join("short"), "whsec_c2hvcnQ=").expect("write");
        std::fs::write(
            folder.join("good"),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .expect("write");
        let text = format!(
            "{PLATFORM}\n[platforms.makini.webhooks]\nconnection_pointer = \"/connectionId\"\n\
             secrets = [{{ file = \"{0}/good\" }}, {{ file = \"{0}/short\" }}]\n",
            folder.display()
        );
        let problems = parse(&text).expect_err("invalid");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "platforms.makini.webhooks.secrets[1]");
        assert!(
            problems[0].message.contains("24 to 64"),
            "{}",
            problems[0].message
        );
        let _ = std::fs::remove_dir_all(folder);
    }
}
