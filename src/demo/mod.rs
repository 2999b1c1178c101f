//! `connwatch demo`: a tour of the real daemon against a simulated platform on loopback.
//!
//! Three customer connections; one customer changes their password; connwatch notices,
//! records why, and recovers when the customer reconnects and the token file is rotated.

pub mod mailbox;
pub mod platform;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::broadcast;

use crate::app::{self, Hooks, Running};
use crate::clock::Clock;
use crate::commands::write_table;
use crate::config::Config;
use crate::domain::{Health, time};
use crate::schedule::Event;
use platform::{Behaviour, FakePlatform};

const CUSTOMERS: [(&str, &str); 3] = [
    ("acme", "ACME Pest Control — WorkWave Service"),
    ("bugfree", "BugFree Exterminators — ERP"),
    ("greenlawn", "GreenLawn Care — CMMS"),
];

/// Runs the tour, printing to `out`; finishes within about half a minute.
pub async fn run(out: &mut impl Write) -> anyhow::Result<()> {
    let folder = TempFolder::new()?;
    let result = tokio::time::timeout(Duration::from_secs(60), tour(folder.path(), out)).await;
    match result {
        Ok(outcome) => outcome,
        Err(_) => anyhow::bail!("the demo did not finish within a minute"),
    }
}

async fn tour(folder: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let platform = FakePlatform::start()
        .await
        .context("cannot start the simulated platform")?;
    writeln!(out, "== connwatch demo ==")?;
    writeln!(
        out,
        "A simulated integration platform is listening on {}.",
        platform.base_url()
    )?;
    for (id, _) in CUSTOMERS {
        let token = format!("tok_{id}_v1");
        platform.set(&token, Behaviour::Healthy);
        std::fs::write(folder.join(format!("{id}.token")), &token)?;
    }
    let mailbox = mailbox::Mailbox::start()
        .await
        .context("cannot start the demo mailbox")?;
    let config = Config::parse(&demo_config(folder, &platform.base_url(), mailbox.port))
        .map_err(|problems| anyhow::anyhow!("demo config invalid: {problems:?}"))?;
    let running = app::start(config, Hooks::default()).await?;
    let mut events = running.events.subscribe();
    writeln!(
        out,
        "connwatch is probing {} connections every 2 s, each with its own token.",
        CUSTOMERS.len()
    )?;

    wait_for(
        &mut events,
        |id, to| !id.is_empty() && to == Health::Healthy,
        CUSTOMERS.len(),
        out,
    )
    .await?;
    writeln!(out, "\nAll connections are healthy.")?;
    print_status(&running, out).await?;
    credentials_change(&platform, &running, &mut events, &mailbox, out).await?;
    reconnect(folder, &platform, &running, &mut events, out).await?;
    print_incident(&running, out).await?;
    recovery_notices(&mailbox, out).await?;
    running.shutdown().await;
    platform.stop();
    Ok(())
}

/// Act two: ACME's password changes, connwatch confirms it and emails ACME.
async fn credentials_change(
    platform: &FakePlatform,
    running: &app::Running,
    events: &mut broadcast::Receiver<Event>,
    mailbox: &mailbox::Mailbox,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n-- ACME changes the password of their WorkWave account. --"
    )?;
    writeln!(
        out,
        "The platform's connection loses access; its token now gets 401 AUTHENTICATION_FAILED."
    )?;
    platform.set("tok_acme_v1", Behaviour::Revoked);
    wait_for(
        events,
        |id, to| id == "acme" && to == Health::NeedsReauth,
        1,
        out,
    )
    .await?;
    writeln!(
        out,
        "\nconnwatch confirmed the auth failure (2 in a row, a quick re-probe in between): ACME must reconnect."
    )?;
    print_status(running, out).await?;
    let customer_email = wait_for_email(mailbox, "it@acme.example", "Action needed").await?;
    writeln!(
        out,
        "\nThe email ACME's contact receives (captured by the demo's mailbox):"
    )?;
    print_email(&customer_email, out)?;

    Ok(())
}

/// Act three: ACME reconnects; the new token file is noticed and probed at once.
async fn reconnect(
    folder: &Path,
    platform: &FakePlatform,
    running: &app::Running,
    events: &mut broadcast::Receiver<Event>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n-- ACME reconnects through the platform's auth flow; a new token is issued --"
    )?;
    writeln!(
        out,
        "The new token is written to {}; connwatch notices the file changed and probes at once.",
        folder.join("acme.token").display()
    )?;
    platform.set("tok_acme_v2", Behaviour::Healthy);
    std::fs::write(folder.join("acme.token"), "tok_acme_v2")?;
    wait_for(
        events,
        |id, to| id == "acme" && to == Health::Healthy,
        1,
        out,
    )
    .await?;
    writeln!(out)?;
    print_status(running, out).await?;
    Ok(())
}

/// The closed incident, as the store keeps it.
async fn print_incident(running: &app::Running, out: &mut impl Write) -> anyhow::Result<()> {
    let acme = crate::domain::ConnectionId::parse("acme").map_err(anyhow::Error::msg)?;
    let detail = running.store.connection_detail(&acme).await?;
    if let Some(incident) = detail.as_ref().and_then(|detail| detail.incidents.first()) {
        writeln!(
            out,
            "\nIncident #{}: {} from {} to {}, error code {}, request id {}.",
            incident.id,
            incident.kind,
            time::rfc3339(incident.first_failure_at),
            incident
                .closed_at
                .map(time::rfc3339)
                .unwrap_or_else(|| "now".into()),
            incident.error_code.as_deref().unwrap_or("-"),
            incident.request_id.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

/// The recovery notice and what staff got.
async fn recovery_notices(mailbox: &mailbox::Mailbox, out: &mut impl Write) -> anyhow::Result<()> {
    let resolved = wait_for_email(mailbox, "it@acme.example", "Resolved").await?;
    writeln!(out, "\nAnd the recovery notice:")?;
    print_email(&resolved, out)?;
    let staff = mailbox
        .messages()
        .iter()
        .filter(|message| {
            message
                .to
                .iter()
                .any(|to| to == "oncall@yourcompany.example")
        })
        .count();
    writeln!(
        out,
        "\nStaff (oncall@yourcompany.example) got {staff} email(s) with the internal details: the platform's \
         error message and the request id."
    )?;
    writeln!(
        out,
        "\nThe tokens never appeared in any output above. Tour finished."
    )?;
    Ok(())
}

/// Prints transitions as they happen until `count` of them match.
async fn wait_for(
    events: &mut broadcast::Receiver<Event>,
    wanted: impl Fn(&str, Health) -> bool,
    count: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut seen = 0;
    while seen < count {
        match events.recv().await {
            Ok(Event::Transition {
                id,
                name,
                transition,
            }) => {
                let mut line = format!(
                    "  {}  {:<40} {} -> {}",
                    time::rfc3339(transition.at),
                    name,
                    transition.from,
                    transition.to
                );
                if let Some(outcome) = transition.outcome {
                    line.push_str(&format!("  outcome={outcome}"));
                }
                if let Some(code) = &transition.error_code {
                    line.push_str(&format!(" error_code={code}"));
                }
                if let Some(request_id) = &transition.request_id {
                    line.push_str(&format!(" request_id={request_id}"));
                }
                if let (Health::NeedsReauth, Some(first)) =
                    (transition.to, transition.first_failure_at)
                {
                    line.push_str(&format!(" first_failure={}", time::rfc3339(first)));
                }
                writeln!(out, "{line}")?;
                if wanted(id.as_str(), transition.to) {
                    seen += 1;
                }
            }
            Ok(Event::Probed { .. } | Event::WebhookReauth { .. } | Event::Recovered { .. })
            | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => anyhow::bail!("the daemon stopped"),
        }
    }
    Ok(())
}

async fn print_status(running: &Running, out: &mut impl Write) -> anyhow::Result<()> {
    let connections = running.store.list_connections().await?;
    writeln!(out, "\n$ connwatch status")?;
    write_table(&connections, Clock::system().now(), out)?;
    Ok(())
}

async fn wait_for_email(
    mailbox: &mailbox::Mailbox,
    recipient: &str,
    subject_start: &str,
) -> anyhow::Result<mailbox::Captured> {
    for _ in 0..200 {
        let found = mailbox.messages().into_iter().find(|message| {
            message.to.iter().any(|to| to == recipient)
                && message.header("Subject").starts_with(subject_start)
        });
        if let Some(message) = found {
            return Ok(message);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no {subject_start:?} email reached {recipient}")
}

fn print_email(message: &mailbox::Captured, out: &mut impl Write) -> anyhow::Result<()> {
    let rule = "  ".to_owned() + &"-".repeat(72);
    writeln!(out, "{rule}")?;
    writeln!(out, "  From:    {}", message.header("From"))?;
    writeln!(out, "  To:      {}", message.header("To"))?;
    writeln!(out, "  Subject: {}", message.header("Subject"))?;
    writeln!(out)?;
    for line in message.text().lines() {
        writeln!(out, "  {line}")?;
    }
    writeln!(out, "{rule}")?;
    Ok(())
}

fn demo_config(folder: &Path, base_url: &str, smtp_port: u16) -> String {
    let mut text = format!(
        r#"
[store]
url = "sqlite://{db}"

[server]
admin = "127.0.0.1:0"

[probe]
interval = "2s"
timeout = "1s"
confirm_after = "300ms"
failure_threshold = 2
token_check_interval = "200ms"

[platforms.makini]
base_url = "{base_url}"
probe = {{ method = "GET", path = "/v1/connection" }}
error_code_pointer = "/error/code"
auth_failure_codes = ["AUTHENTICATION_FAILED"]
reauth_pointer = "/status"
reauth_values = ["reauthorization_required"]
request_id_header = "x-request-id"

[email]
smtp_url = "smtp://127.0.0.1:{smtp_port}?tls=none"
from = "Connection Monitor <alerts@yourcompany.example>"
staff = ["oncall@yourcompany.example"]
hold = "100ms"
reminders = ["24h"]
"#,
        db = folder.join("connwatch.db").display()
    );
    for (id, name) in CUSTOMERS {
        text.push_str(&format!(
            "\n[[connections]]\nid = \"{id}\"\nname = \"{name}\"\nplatform = \"makini\"\n\
             token = {{ file = \"{}\" }}\ncontacts = [\"it@{id}.example\"]\n\
             reconnect_url = \"https://app.example.com/integrations/{id}/reconnect\"\n",
            folder.join(format!("{id}.token")).display()
        ));
    }
    text
}

/// A private folder under the system temp dir, removed on drop.
struct TempFolder(PathBuf);

impl TempFolder {
    fn new() -> std::io::Result<TempFolder> {
        let path = std::env::temp_dir().join(format!(
            "connwatch-demo-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&path)?;
        Ok(TempFolder(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
