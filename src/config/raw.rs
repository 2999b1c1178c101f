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
];
