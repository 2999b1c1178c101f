//! Test configs: short intervals, connections on a fake platform, and the sections for
//! email, webhooks and the relay, with their secrets written beside the database.

use std::path::{Path, PathBuf};

use connwatch::config::Config;

use super::TestDb;

/// The staff address of every test app with email.
pub const STAFF: &str = "oncall@staff.example";
/// The `makini` platform's webhook signing secret (Standard Webhooks).
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The relay's signing secret.
pub const RELAY_SECRET: &str = "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQQ==";
/// The `nango` platform's webhook secret (hex HMAC).
pub const NANGO_SECRET: &str = "nango-signing-secret-0123456789";

/// One connection of a test config.
pub struct Conn<'a> {
    pub id: &'a str,
    pub platform: &'a str,
    pub token_file: PathBuf,
}

/// A config with short intervals, one `[platforms.NAME]` per (name, base URL).
pub fn config_text(
    db_url: &str,
    platforms: &[(&str, String)],
    connections: &[Conn<'_>],
    extra_probe: &str,
) -> String {
    let mut text = format!(
        "[store]\nurl = \"{db_url}\"\n\n[server]\nadmin = \"127.0.0.1:0\"\n\n[probe]\n\
         interval = \"1s\"\ntimeout = \"500ms\"\nconfirm_after = \"200ms\"\n\
         failure_threshold = 2\ntoken_check_interval = \"100ms\"\n{extra_probe}\n"
    );
    for (name, base_url) in platforms {
        text.push_str(&format!(
            "\n[platforms.{name}]\nbase_url = \"{base_url}\"\n\
             probe = {{ method = \"GET\", path = \"/v1/connection\" }}\n\
             auth_failure_codes = [\"AUTHENTICATION_FAILED\"]\n\
             reauth_pointer = \"/status\"\nreauth_values = [\"reauthorization_required\"]\n\
             request_id_header = \"x-request-id\"\n"
        ));
    }
    for connection in connections {
        text.push_str(&format!(
            "\n[[connections]]\nid = \"{}\"\nname = \"Customer {}\"\nplatform = \"{}\"\n\
             remote_id = \"conn_{}\"\ntoken = {{ file = \"{}\" }}\ncontacts = [\"it@{}.example\"]\n\
             reconnect_url = \"https://app.example.com/reconnect/{}\"\n",
            connection.id,
            connection.id,
            connection.platform,
            connection.id,
            connection.token_file.display(),
            connection.id,
            connection.id
        ));
    }
    text
}

pub fn parse(text: &str) -> Config {
    Config::parse(text).unwrap_or_else(|problems| panic!("test config invalid: {problems:?}"))
}

/// Writes a token file and returns its path.
pub fn token_file(folder: &Path, id: &str, token: &str) -> PathBuf {
    let path = folder.join(format!("{id}.token"));
    std::fs::write(&path, token).expect("write token");
    path
}

/// `[relay]` to `url`, signed with `RELAY_SECRET` (written beside the database).
pub fn relay_section(db: &TestDb, url: &str) -> String {
    let secret = db.path().join("relay.secret");
    std::fs::write(&secret, RELAY_SECRET).expect("relay secret");
    format!(
        "\n[relay]\nurl = \"{url}\"\nsecret = {{ file = \"{}\" }}\ntimeout = \"2s\"\n",
        secret.display()
    )
}

/// `[email]` through the SMTP server on `port`: staff, a 500 ms hold and a 1 s timeout
/// unless `extra` sets its own.
pub fn email_section(port: u16, extra: &str) -> String {
    let hold = if extra.contains("hold =") {
        ""
    } else {
        "hold = \"500ms\"\n"
    };
    let timeout = if extra.contains("timeout =") {
        ""
    } else {
        "timeout = \"1s\"\n"
    };
    let staff = if extra.contains("staff =") {
        String::new()
    } else {
        format!("staff = [\"{STAFF}\"]\n")
    };
    format!(
        "\n[email]\nsmtp_url = \"smtp://127.0.0.1:{port}\"\n\
         from = \"Connection Monitor <alerts@monitor.example>\"\n{staff}{timeout}{hold}{extra}\n"
    )
}

/// Webhooks and recent changes for `makini`, hex-HMAC webhooks for `nango`, the secrets
/// written beside the database, and `settings` for `[webhooks]`.
pub fn webhook_sections(db: &TestDb, settings: &str) -> String {
    std::fs::write(db.path().join("webhook.secret"), WEBHOOK_SECRET).expect("secret");
    std::fs::write(db.path().join("nango.secret"), NANGO_SECRET).expect("secret");
    let folder = db.path().display();
    format!(
        r#"
[platforms.makini.webhooks]
secrets = [{{ file = "{folder}/webhook.secret" }}]
connection_pointer = "/connectionId"
type_pointer = "/type"
reauth_types = ["connection.reauthorization_required"]
change_id_pointer = "/data/id"
change_updated_pointer = "/data/_updatedAt"

[platforms.makini.changes]
path = "/v1/changes"
since_param = "modified_after"
items_pointer = "/data"
next_pointer = "/next"
cursor_param = "cursor"
id_pointer = "/id"
updated_pointer = "/_updatedAt"

[platforms.nango.webhooks]
scheme = "hmac-sha256-hex"
signature_header = "x-nango-hmac-sha256"
secrets = [{{ file = "{folder}/nango.secret" }}]
connection_pointer = "/connectionId"

[webhooks]
{settings}
"#
    )
}
