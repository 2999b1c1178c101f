//! A steady stream of signed webhooks for `acme`, each with a fresh id, and what each
//! delivery was answered: the record that says which deliveries were acknowledged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connwatch::webhook::verify::{decode_standard_secret, sign_standard};

use crate::helpers::{WEBHOOK_SECRET, now_millis};

/// What one delivery was answered: its webhook id and status (`None`: no answer at all,
/// the connection failed or timed out).
#[derive(Debug, Clone)]
pub struct Answer {
    pub webhook_id: String,
    pub status: Option<u16>,
}

impl Answer {
    /// Answered 2xx: the daemon said it has the delivery.
    pub fn acknowledged(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }
}

/// A sender loop running until `stop`.
pub struct Load {
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Sends signed deliveries to the `makini` listener at `webhooks`, one after another,
    /// each body padded with `padding` bytes.
    pub fn start(webhooks: SocketAddr, padding: usize) -> Load {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(send_until_stopped(
            webhooks,
            padding,
            answers.clone(),
            stop.clone(),
        ));
        Load {
            answers,
            stop,
            task,
        }
    }

    /// How many deliveries have been answered so far.
    pub fn sent(&self) -> usize {
        self.answers.lock().expect("answers").len()
    }

    /// How many deliveries after the first `since` were answered as `wanted` says.
    pub fn count_since(&self, since: usize, wanted: impl Fn(&Answer) -> bool) -> usize {
        let answers = self.answers.lock().expect("answers");
        answers
            .iter()
            .skip(since)
            .filter(|answer| wanted(answer))
            .count()
    }

    /// Stops sending (after the delivery in flight) and returns every answer.
    pub async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::SeqCst);
        let answers = self.answers.clone();
        self.task.await.expect("the sender loop");
        let answers = answers.lock().expect("answers").clone();
        answers
    }
}

async fn send_until_stopped(
    webhooks: SocketAddr,
    padding: usize,
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let key = decode_standard_secret(WEBHOOK_SECRET).expect("secret");
    let url = format!("http://{webhooks}/webhooks/makini");
    let mut number = 0_u64;
    while !stop.load(Ordering::SeqCst) {
        number += 1;
        let webhook_id = format!("msg_load_{number}");
        let body = serde_json::json!({
            "type": "record.updated",
            "connectionId": "conn_acme",
            "data": {"id": format!("rec_{number}"), "_updatedAt": now_millis()},
            "padding": "x".repeat(padding),
        })
        .to_string();
        let timestamp = now_millis() / 1000;
        let signature = sign_standard(&key, &webhook_id, timestamp, body.as_bytes());
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .header("webhook-id", &webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let status = sent.ok().map(|response| response.status().as_u16());
        if status.is_none() {
            // Nothing listening for a moment: no need to spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
            .lock()
            .expect("answers")
            .push(Answer { webhook_id, status });
    }
}

/// The status `/readyz` answers on the admin listener (0 when there is no answer).
pub async fn readyz(admin: impl std::fmt::Display) -> u16 {
    readyz_answer(admin).await.0
}

/// The status and text `/readyz` answers (0 and nothing when there is no answer).
pub async fn readyz_answer(admin: impl std::fmt::Display) -> (u16, String) {
    let Ok(response) = reqwest::get(format!("http://{admin}/readyz")).await else {
        return (0, String::new());
    };
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}
