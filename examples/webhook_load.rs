//! Webhook ingest load generator for `bench/run.sh` (loopback only, bounded in time and count).
//!
//! CONCURRENCY senders POST signed Standard Webhooks deliveries (distinct `webhook-id` each,
//! `webhook-timestamp` = now, ~BODY_BYTES JSON bodies naming one of REMOTE_IDS) over
//! keep-alive connections until DURATION has passed or MAX_REQUESTS were sent, then print
//! one line: `sent N ok N accepted N other N rate R/s p50 X ms p90 X ms p99 Y ms max Z ms
//! cpu_us_per_req C`.
//!
//! ```sh
//! cargo run --release --example webhook_load -- URL SECRET_FILE DURATION_S CONCURRENCY \
//!     REMOTE_IDS [BODY_BYTES] [MAX_REQUESTS] [THREADS]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use connwatch::webhook::verify::{decode_standard_secret, sign_standard};

struct Args {
    url: String,
    key: Vec<u8>,
    duration: Duration,
    concurrency: usize,
    remote_ids: Vec<String>,
    body_bytes: usize,
    max_requests: u64,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err(
            "usage: webhook_load URL SECRET_FILE DURATION_S CONCURRENCY REMOTE_IDS \
                    [BODY_BYTES] [MAX_REQUESTS] [THREADS]"
                .to_owned(),
        );
    }
    let number = |index: usize, default: u64| -> Result<u64, String> {
        match args.get(index) {
            Some(text) => text
                .parse()
                .map_err(|_| format!("argument {} is not a number: {text}", index + 1)),
            None => Ok(default),
        }
    };
    let secret = std::fs::read_to_string(&args[1])
        .map_err(|error| format!("cannot read {}: {error}", args[1]))?;
    let key = decode_standard_secret(secret.trim())?;
    Ok(Args {
        url: args[0].clone(),
        key,
        duration: Duration::from_secs_f64(
            args[2]
                .parse()
                .map_err(|_| format!("bad duration: {}", args[2]))?,
        ),
        concurrency: number(3, 64)?.max(1) as usize,
        remote_ids: args[4].split(',').map(str::to_owned).collect(),
        body_bytes: number(5, 1024)? as usize,
        max_requests: number(6, 5_000_000)?,
        threads: number(7, 1)?.max(1) as usize,
    })
}

/// A JSON body of about `size` bytes for `remote_id`.
fn body(remote_id: &str, seq: u64, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"type":"connection.updated","connectionId":"{remote_id}","data":{{"id":"rec_{seq}","_updatedAt":"2026-11-28T10:00:00.000Z","pad":""#
    );
    let tail = r#""}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = String::with_capacity(size);
    out.push_str(&head);
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str(tail);
    out.into_bytes()
}

/// This process's CPU time (user + system) in microseconds, from /proc/self/stat.
fn cpu_micros() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some(after) = stat.rsplit_once(") ").map(|(_, rest)| rest) else {
        return 0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    ticks * 10_000 // CLK_TCK is 100 on Linux
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    ok: u64,
    accepted: u64,
    other: u64,
}

async fn sender(
    task: usize,
    client: reqwest::Client,
    args: Arc<Args>,
    run: u64,
    deadline: Instant,
    budget: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        if budget.fetch_add(1, Ordering::Relaxed) >= args.max_requests {
            break;
        }
        seq += 1;
        let remote_id = &args.remote_ids[(task + seq as usize) % args.remote_ids.len()];
        let payload = body(remote_id, seq, args.body_bytes);
        let id = format!("msg_{run:x}_{task}_{seq}");
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let signature = sign_standard(&args.key, &id, timestamp, &payload);
        let started = Instant::now();
        let answer = client
            .post(&args.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(payload)
            .send()
            .await;
        match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.bytes().await.unwrap_or_default();
                tally
                    .latencies_us
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if status == 200 {
                    tally.ok += 1;
                    if text.windows(8).any(|w| w == b"accepted") {
                        tally.accepted += 1;
                    }
                } else {
                    tally.other += 1;
                    if tally.other <= 3 {
                        eprintln!("answer {status}: {}", String::from_utf8_lossy(&text));
                    }
                }
            }
            Err(error) => {
                tally.other += 1;
                if tally.other <= 3 {
                    eprintln!("request failed: {error}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn main() {
    let args = match parse_args() {
        Ok(args) => Arc::new(args),
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        let run = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let budget = Arc::new(AtomicU64::new(0));
        let cpu_start = cpu_micros();
        let started = Instant::now();
        let deadline = started + args.duration;
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|task| {
                tokio::spawn(sender(
                    task,
                    client.clone(),
                    args.clone(),
                    run,
                    deadline,
                    budget.clone(),
                ))
            })
            .collect();
        let mut total = Tally::default();
        for task in tasks {
            if let Ok(tally) = task.await {
                total.latencies_us.extend(tally.latencies_us);
                total.ok += tally.ok;
                total.accepted += tally.accepted;
                total.other += tally.other;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_micros().saturating_sub(cpu_start);
        total.latencies_us.sort_unstable();
        let sent = total.ok + total.other;
        println!(
            "sent {sent} ok {} accepted {} other {} rate {:.0}/s p50 {:.2} ms p90 {:.2} ms \
             p99 {:.2} ms max {:.2} ms cpu_us_per_req {:.1}",
            total.ok,
            total.accepted,
            total.other,
            total.ok as f64 / elapsed,
            percentile(&total.latencies_us, 0.50),
            percentile(&total.latencies_us, 0.90),
            percentile(&total.latencies_us, 0.99),
            percentile(&total.latencies_us, 1.0),
            cpu as f64 / sent.max(1) as f64,
        );
    });
}
