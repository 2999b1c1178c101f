//! Profiles shared by the fuzz targets: the platform of `connwatch.example.toml`, built
//! directly (no secrets to read), so each input exercises the code under test only.

use connwatch::config::{ChangesConfig, PlatformConfig, PlatformWebhooks, SignatureScheme};

/// The example's `[platforms.makini.webhooks]`, with the given scheme.
pub fn webhook_profile(scheme: SignatureScheme) -> PlatformWebhooks {
    PlatformWebhooks {
        secrets: Vec::new(),
        scheme,
        id_header: Some("x-delivery-id".into()),
        connection_pointer: "/connectionId".into(),
        type_pointer: Some("/type".into()),
        reauth_types: vec!["connection.reauthorization_required".into()],
        reconnect_types: vec!["connection.reconnected".into()],
        change_id_pointer: Some("/data/id".into()),
        change_updated_pointer: Some("/data/_updatedAt".into()),
    }
}

/// The example's `[platforms.makini.changes]`.
pub fn changes_profile() -> ChangesConfig {
    ChangesConfig {
        path: "/v1/changes".into(),
        since_param: "modified_after".into(),
        items_pointer: "/data".into(),
        next_pointer: "/next".into(),
        cursor_param: "cursor".into(),
        id_pointer: "/id".into(),
        updated_pointer: "/_updatedAt".into(),
        max_pages: 1000,
    }
}

/// The example's `[platforms.makini]`: a profile that reads bodies (reauth pointer, error
/// code and message pointers, auth failure codes, request id header).
pub fn platform() -> PlatformConfig {
    PlatformConfig {
        name: "makini".into(),
        base_url: "https://api.example-platform.test".into(),
        probe_method: http::Method::GET,
        probe_path: "/v1/connection".into(),
        auth_header: "Authorization".into(),
        auth_scheme: "Bearer".into(),
        auth_failure_status: vec![401, 403],
        reauth_pointer: Some("/status".into()),
        reauth_values: vec!["reauthorization_required".into()],
        error_code_pointer: Some("/error/code".into()),
        error_message_pointer: Some("/error/message".into()),
        auth_failure_codes: vec!["AUTHENTICATION_FAILED".into()],
        request_id_header: Some("x-request-id".into()),
        concurrency: 128,
        rate_limit: Some(500),
        webhooks: Some(webhook_profile(SignatureScheme::Standard)),
        changes: Some(changes_profile()),
    }
}

/// The same platform with a plain profile: no body read on a success, no codes.
pub fn plain_platform() -> PlatformConfig {
    PlatformConfig {
        reauth_pointer: None,
        reauth_values: Vec::new(),
        error_code_pointer: None,
        error_message_pointer: None,
        auth_failure_codes: Vec::new(),
        request_id_header: None,
        ..platform()
    }
}
