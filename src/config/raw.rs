//! The config file exactly as written: strings where validation needs to say more than serde.

use serde::Deserialize;

use super::secret::SecretRef;

#[derive(Debug, Default, Deserialize)]
pub struct RawStore {
    pub url: Option<String>,
    pub retention: Option<String>,
    pub prune_schedule: Option<String>,
    pub max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    pub admin: Option<String>,
    pub admin_token: Option<SecretRef>,
    pub webhooks: Option<String>,
    pub webhook_max_bytes: Option<u32>,
    #[serde(default)]
    pub per_connection_metrics: bool,
    pub admin_hosts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawPlatformWebhooks {
    #[serde(default)]
    pub secrets: Vec<SecretRef>,
    pub scheme: Option<String>,
    pub signature_header: Option<String>,
    pub id_header: Option<String>,
    pub connection_pointer: String,
    pub type_pointer: Option<String>,
    #[serde(default)]
    pub reauth_types: Vec<String>,
    #[serde(default)]
    pub reconnect_types: Vec<String>,
    pub change_id_pointer: Option<String>,
    pub change_updated_pointer: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawChanges {
    pub path: String,
    pub since_param: Option<String>,
    pub items_pointer: Option<String>,
    pub next_pointer: Option<String>,
    pub cursor_param: Option<String>,
    pub id_pointer: Option<String>,
    pub updated_pointer: Option<String>,
    pub max_pages: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawWebhooks {
    pub expected_interval: Option<String>,
    pub grace: Option<String>,
    pub poll_interval: Option<String>,
    pub overlap: Option<String>,
    pub retention: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawEmail {
    pub smtp_url: String,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    pub from: String,
    #[serde(default)]
    pub staff: Vec<String>,
    pub reminders: Option<Vec<String>>,
    pub send_resolved: Option<bool>,
    pub templates: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<String>,
    pub hold: Option<String>,
    pub storm_window: Option<String>,
    pub storm_min_connections: Option<u32>,
    pub storm_share: Option<f64>,
    pub daily_digest: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawRelay {
    pub url: String,
    pub secret: SecretRef,
    pub timeout: Option<String>,
    pub max_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawProbe {
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub concurrency: Option<u32>,
    pub confirm_after: Option<String>,
    pub failure_threshold: Option<u32>,
    pub unreachable_threshold: Option<u32>,
    pub reauth_backoff: Option<String>,
    pub token_check_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawRequest {
    pub method: Option<String>,
    pub path: String,
}

#[derive(Debug, Deserialize)]
pub struct RawAuth {
    pub header: Option<String>,
    pub scheme: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawPlatform {
    pub base_url: String,
    pub probe: RawRequest,
    pub auth: Option<RawAuth>,
    pub auth_failure_status: Option<Vec<u16>>,
    pub reauth_pointer: Option<String>,
    #[serde(default)]
    pub reauth_values: Vec<String>,
    pub error_code_pointer: Option<String>,
    pub error_message_pointer: Option<String>,
    #[serde(default)]
    pub auth_failure_codes: Vec<String>,
    pub request_id_header: Option<String>,
    pub concurrency: Option<u32>,
    pub rate_limit: Option<u32>,
    pub webhooks: Option<RawPlatformWebhooks>,
    pub changes: Option<RawChanges>,
}

#[derive(Debug, Deserialize)]
pub struct RawConnection {
    pub id: String,
    pub name: Option<String>,
    pub platform: String,
    pub remote_id: Option<String>,
    pub token: SecretRef,
    #[serde(default)]
    pub contacts: Vec<String>,
    pub reconnect_url: Option<String>,
    #[serde(default)]
    pub paused: bool,
    pub expected_webhook_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// Top-level section names and whether each is known.
pub const SECTIONS: &[&str] = &[
    "store",
    "server",
    "probe",
    "platforms",
    "connections",
    "log",
    "webhooks",
    "relay",
    "email",
];
