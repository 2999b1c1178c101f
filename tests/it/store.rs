//! The store test suite, run against a real SQLite file and the real PostgreSQL.

use std::collections::HashSet;

use crate::helpers::{Kind, TestDb, both_backends};
use connwatch::domain::{ConnectionId, Health, Outcome, ProbeReport};
use connwatch::rules::{Policy, Rules, classify};
use connwatch::store::{Claimed, ProbeRecord, Store, SyncConnection};

const POLICY: Policy = Policy {
    failure_threshold: 2,
    unreachable_threshold: 3,
    confirm_after: 1_000,
    reauth_backoff: 60_000,
};
/// The rules of the store tests: no `[email]`, so no emails are planned.
const RULES: Rules = Rules {
    probe: POLICY,
    mail: None,
    storm: None,
};

fn id(raw: &str) -> ConnectionId {
    ConnectionId::parse(raw).expect("id")
}

/// A configured connection as the daemon hands it to the store (borrowed from its config;
/// leaked here, a few bytes per test).
fn sync(raw: &str, first_due: i64) -> SyncConnection<'static> {
    let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
    SyncConnection {
        id: Box::leak(Box::new(id(raw))),
        name: leak(format!("Customer {raw}")),
        platform: "makini",
        remote_id: Some(leak(format!("conn_{raw}"))),
        paused: false,
        first_due,
        expected_webhook_ms: Some(60_000),
        contacts: vec![leak(format!("it@{raw}.example"))],
        reconnect_url: Some(leak(format!("https://app.example.com/{raw}/reconnect"))),
    }
}

fn report(outcome: Outcome) -> ProbeReport {
    ProbeReport {
        outcome,
        status: Some(if outcome == Outcome::Ok { 200 } else { 401 }),
        latency_ms: 12,
        request_id: Some("req_1".into()),
        error_code: (outcome == Outcome::AuthFailed).then(|| "AUTHENTICATION_FAILED".into()),
        message: None,
        retry_after_secs: None,
    }
}

async fn open(db: &TestDb) -> Store {
    let store = Store::connect(&db.url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// Configures `count` connections `c0000`, `c0001`, …, due from 1,000 ms on, `per_ms` of
/// them each millisecond.
async fn due_fleet(store: &Store, count: usize, per_ms: usize) {
    let connections: Vec<_> = (0..count)
        .map(|n| sync(&format!("c{n:04}"), 1_000 + (n / per_ms) as i64))
        .collect();
    store.sync_connections(&connections, 0).await.expect("sync");
}

/// A successful probe of a claimed connection at `at` by `owner-a`, next due at `next_due`.
fn ok_record(claim: Claimed, at: i64, next_due: i64) -> ProbeRecord {
    let verdict = classify(&claim.state, &report(Outcome::Ok), &POLICY, at, next_due);
    ProbeRecord {
        id: claim.id,
        at,
        report: report(Outcome::Ok),
        verdict,
        last_outcome: claim.last_outcome,
        lease_owner: "owner-a".into(),
    }
}

/// Claims `raw` now, probes with `outcome`, records; returns the new health.
async fn probe(store: &Store, raw: &str, outcome: Outcome, now: i64) -> Health {
    let claim = store
        .claim_one(&id(raw), now, "owner-a", now + 60_000)
        .await
        .expect("claim")
        .expect("claimable");
    let verdict = classify(&claim.state, &report(outcome), &POLICY, now, now + 300_000);
    let health = verdict.state.health;
    let applied = store
        .record_probes(&[ProbeRecord {
            id: claim.id,
            at: now,
            report: report(outcome),
            verdict,
            last_outcome: claim.last_outcome,
            lease_owner: "owner-a".into(),
        }])
        .await
        .expect("record");
    assert_eq!(applied.len(), 1);
    health
}

async fn claim_due_leases_each_connection_to_one_claimer(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    let connections: Vec<_> = (0..40).map(|n| sync(&format!("c{n}"), 1_000)).collect();
    store.sync_connections(&connections, 0).await.expect("sync");
    assert!(
        store
            .claim_due(999, 100, "early", 50_000)
            .await
            .expect("claim")
            .is_empty()
    );
    let (first, second) = tokio::join!(
        store.claim_due(2_000, 25, "owner-a", 60_000),
        store.claim_due(2_000, 25, "owner-b", 60_000)
    );
    let (first, second) = (first.expect("claim a"), second.expect("claim b"));
    assert_eq!(
        first.len() + second.len(),
        40,
        "every due connection claimed once"
    );
    let ids: HashSet<_> = first
        .iter()
        .chain(&second)
        .map(|claim| claim.id.clone())
        .collect();
    assert_eq!(ids.len(), 40, "no connection claimed twice");
    assert!(
        store
            .claim_due(3_000, 100, "owner-c", 60_000)
            .await
            .expect("claim")
            .is_empty()
    );
    let after_lease = store
        .claim_due(61_000, 100, "owner-c", 120_000)
        .await
        .expect("claim");
    assert_eq!(after_lease.len(), 40, "expired leases are taken over");
}

async fn credential_change_opens_and_recovery_closes_an_incident(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("acme", 0)], 0)
        .await
        .expect("sync");
    assert_eq!(
        probe(&store, "acme", Outcome::Ok, 1_000).await,
        Health::Healthy
    );
    assert_eq!(
        probe(&store, "acme", Outcome::AuthFailed, 2_000).await,
        Health::Degraded
    );
    assert_eq!(
        probe(&store, "acme", Outcome::AuthFailed, 3_000).await,
        Health::NeedsReauth
    );
    let detail = store
        .connection_detail(&id("acme"))
        .await
        .expect("read")
        .expect("exists");
    let incident = detail.summary.open_incident.expect("open incident");
    assert_eq!(incident.kind, Health::NeedsReauth);
    assert_eq!(
        incident.first_failure_at, 2_000,
        "the first failing time is kept"
    );
    assert_eq!(
        incident.error_code.as_deref(),
        Some("AUTHENTICATION_FAILED")
    );
    assert_eq!(incident.request_id.as_deref(), Some("req_1"));

    assert_eq!(
        probe(&store, "acme", Outcome::Ok, 4_000).await,
        Health::Healthy
    );
    let detail = store
        .connection_detail(&id("acme"))
        .await
        .expect("read")
        .expect("exists");
    assert!(detail.summary.open_incident.is_none());
    assert_eq!(detail.incidents.len(), 1);
    assert_eq!(detail.incidents[0].closed_at, Some(4_000));
    let path: Vec<(Health, Health)> = detail
        .transitions
        .iter()
        .rev()
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        path,
        vec![
            (Health::Unknown, Health::Healthy),
            (Health::Healthy, Health::Degraded),
            (Health::Degraded, Health::NeedsReauth),
            (Health::NeedsReauth, Health::Healthy),
        ]
    );
}

async fn state_survives_reopening_the_database(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("acme", 0)], 0)
        .await
        .expect("sync");
    probe(&store, "acme", Outcome::AuthFailed, 1_000).await;
    probe(&store, "acme", Outcome::AuthFailed, 2_000).await;
    store.close().await;
    let reopened = open(&db).await;
    let listed = reopened.list_connections().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].health, Health::NeedsReauth);
    assert_eq!(
        listed[0].last_error_code.as_deref(),
        Some("AUTHENTICATION_FAILED")
    );
    let claim = reopened
        .claim_one(&id("acme"), 3_000, "again", 9_000)
        .await
        .expect("claim")
        .expect("claimable");
    assert_eq!(claim.state.consecutive_auth_failures, 2, "counters survive");
}

async fn a_record_whose_lease_was_taken_over_is_dropped(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("acme", 0)], 0)
        .await
        .expect("sync");
    let stale = store
        .claim_due(1_000, 10, "slow", 2_000)
        .await
        .expect("claim")
        .remove(0);
    let _fresh = store
        .claim_due(3_000, 10, "fast", 90_000)
        .await
        .expect("claim")
        .remove(0);
    let verdict = classify(&stale.state, &report(Outcome::Ok), &POLICY, 3_500, 300_000);
    let applied = store
        .record_probes(&[ProbeRecord {
            id: stale.id.clone(),
            at: 3_500,
            report: report(Outcome::Ok),
            verdict,
            last_outcome: None,
            lease_owner: "slow".into(),
        }])
        .await
        .expect("record");
    assert_eq!(
        applied.len(),
        0,
        "the slow owner's result must not count twice"
    );
}

async fn sync_deactivates_removed_connections_and_counts_health(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("a", 0), sync("b", 0), sync("c", 0)], 0)
        .await
        .expect("sync");
    probe(&store, "a", Outcome::Ok, 1_000).await;
    let removed = store
        .sync_connections(&[sync("a", 0), sync("b", 0)], 2_000)
        .await
        .expect("sync");
    assert_eq!(removed, 1);
    let counts = store.health_counts().await.expect("counts");
    let count = |health: Health| counts.iter().find(|(h, _)| *h == health).map(|(_, n)| *n);
    assert_eq!(count(Health::Healthy), Some(1));
    assert_eq!(count(Health::Unknown), Some(1));
    assert_eq!(count(Health::NeedsReauth), Some(0));
    let mut paused = sync("b", 0);
    paused.paused = true;
    store
        .sync_connections(&[sync("a", 0), paused], 3_000)
        .await
        .expect("sync");
    let listed = store.list_connections().await.expect("list");
    assert_eq!(
        listed
            .iter()
            .find(|c| c.id.as_str() == "b")
            .map(|c| c.health),
        Some(Health::Paused)
    );
}

async fn pruning_removes_only_old_probe_history(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("acme", 0)], 0)
        .await
        .expect("sync");
    probe(&store, "acme", Outcome::AuthFailed, 1_000).await;
    probe(&store, "acme", Outcome::AuthFailed, 5_000).await;
    assert_eq!(store.prune_probe_results(2_000).await.expect("prune"), 1);
    let detail = store
        .connection_detail(&id("acme"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(detail.probes.len(), 1);
    assert_eq!(detail.transitions.len(), 2, "transitions are kept");
}

async fn steady_successes_do_not_grow_the_history(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("acme", 0)], 0)
        .await
        .expect("sync");
    for step in 1..=10 {
        probe(&store, "acme", Outcome::Ok, step * 1_000).await;
    }
    let detail = store
        .connection_detail(&id("acme"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        detail.probes.len(),
        1,
        "only the first success (a change) is a history row"
    );
    assert_eq!(
        detail.summary.last_probe_at,
        Some(10_000),
        "the latest result is kept"
    );
}

/// Claim after claim while nothing is recorded: every due connection is claimed exactly
/// once, in due order (on SQLite the claim reads on from a cursor and skips what it holds);
/// a recorded one is not due again until its next slot, unless a probe is asked for.
async fn successive_claims_take_every_due_connection_once(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    due_fleet(&store, 100, 4).await;
    let mut seen = HashSet::new();
    let mut last_due = 0;
    let mut first = None;
    for turn in 0..10 {
        let claims = store
            .claim_due(5_000 + turn, 10, "owner-a", 60_000)
            .await
            .expect("claim");
        assert_eq!(claims.len(), 10, "turn {turn}");
        for claim in &claims {
            assert!(claim.due >= last_due, "earliest due first");
            assert!(seen.insert(claim.id.clone()), "{} claimed twice", claim.id);
        }
        last_due = claims
            .iter()
            .map(|claim| claim.due)
            .max()
            .unwrap_or(last_due);
        first = first.or_else(|| {
            claims
                .into_iter()
                .find(|claim| claim.id.as_str() == "c0000")
        });
    }
    assert!(
        store
            .claim_due(5_100, 10, "owner-a", 60_000)
            .await
            .expect("claim")
            .is_empty(),
        "all 100 are held"
    );
    let claim = first.expect("c0000 claimed");
    let first = claim.id.clone();
    let applied = store
        .record_probes(&[ok_record(claim, 5_200, 300_000)])
        .await
        .expect("record");
    assert_eq!(applied.len(), 1);
    assert!(
        store
            .claim_due(5_300, 10, "owner-b", 60_000)
            .await
            .expect("claim")
            .is_empty(),
        "recorded: due at its next slot, not now"
    );
    assert!(store.request_probe(&first, 5_400).await.expect("request"));
    let asked = store
        .claim_due(5_500, 10, "owner-b", 60_000)
        .await
        .expect("claim");
    assert_eq!(
        asked
            .iter()
            .map(|claim| claim.id.clone())
            .collect::<Vec<_>>(),
        vec![first],
        "a probe asked for is claimed at once"
    );
}

/// A batch of deliveries for several connections of a platform, one unknown and one
/// repeated: each answered as it should be, activity and watermarks per connection.
async fn a_webhook_batch_is_matched_deduplicated_and_marks_activity(kind: Kind) {
    use connwatch::store::{WebhookDelivery, WebhookStored};
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("a", 0), sync("b", 0), sync("c", 0)], 0)
        .await
        .expect("sync");
    let delivery =
        |webhook_id: &str, remote_id: &str, updated: Option<i64>, at: i64| WebhookDelivery {
            platform: "makini".into(),
            webhook_id: webhook_id.into(),
            received_at: at,
            remote_id: remote_id.into(),
            event_type: Some("record.updated".into()),
            change_id: updated.map(|_| format!("chg_{webhook_id}")),
            change_updated: updated,
            reauth: false,
            reconnected: false,
            body: "{}".into(),
        };
    let results = store
        .record_webhooks(
            &[
                delivery("m1", "conn_b", Some(500), 1_000),
                delivery("m2", "conn_a", Some(700), 1_100),
                delivery("m3", "conn_gone", None, 1_200),
                delivery("m1", "conn_b", Some(500), 1_300),
                delivery("m4", "conn_b", Some(400), 1_400),
            ],
            &RULES,
        )
        .await
        .expect("record");
    let summary: Vec<String> = results
        .iter()
        .map(|result| match result {
            WebhookStored::Accepted { connection, .. } => format!("accepted {connection}"),
            WebhookStored::Duplicate => "duplicate".into(),
            WebhookStored::UnknownConnection => "unknown".into(),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "accepted b",
            "accepted a",
            "unknown",
            "duplicate",
            "accepted b"
        ]
    );
    let listed = store.list_connections().await.expect("list");
    let find = |raw: &str| {
        listed
            .iter()
            .find(|connection| connection.id.as_str() == raw)
            .expect("listed")
    };
    assert_eq!(
        (find("a").last_webhook_at, find("a").watermark),
        (Some(1_100), Some(700))
    );
    assert_eq!(
        (find("b").last_webhook_at, find("b").watermark),
        (Some(1_400), Some(500)),
        "the newest change, not the last delivered"
    );
    assert_eq!(
        (find("c").last_webhook_at, find("c").watermark),
        (None, None)
    );
    let again = store
        .record_webhooks(&[delivery("m2", "conn_a", Some(700), 2_000)], &RULES)
        .await
        .expect("record again");
    assert!(matches!(again[..], [WebhookStored::Duplicate]));
}

/// A reload removes a connection while its probe is in flight: the result is dropped,
/// the removed connection keeps its last stored state.
async fn a_result_for_a_connection_removed_meanwhile_is_dropped(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("a", 0), sync("b", 0)], 0)
        .await
        .expect("sync");
    let claims = store
        .claim_due(1_000, 10, "owner-a", 60_000)
        .await
        .expect("claim");
    assert_eq!(claims.len(), 2);
    store
        .sync_connections(&[sync("b", 0)], 1_500)
        .await
        .expect("reload without a");
    let records: Vec<ProbeRecord> = claims
        .into_iter()
        .map(|claim| {
            let outcome = if claim.id.as_str() == "a" {
                Outcome::ClientError
            } else {
                Outcome::Ok
            };
            ProbeRecord {
                verdict: classify(&claim.state, &report(outcome), &POLICY, 2_000, 300_000),
                id: claim.id,
                at: 2_000,
                report: report(outcome),
                last_outcome: None,
                lease_owner: "owner-a".into(),
            }
        })
        .collect();
    let applied = store.record_probes(&records).await.expect("record");
    assert_eq!(
        applied.into_iter().collect::<Vec<_>>(),
        vec!["b".to_owned()],
        "only the configured connection's result is stored"
    );
}

/// The daemon claims while results are committed (on SQLite the claim reads beside the
/// writer, from a snapshot that may predate a commit): a connection whose result was just
/// stored must not be claimed again from that older view.
async fn claims_beside_result_commits_never_take_a_connection_twice(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    due_fleet(&store, 2_000, 8).await;
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Vec<ProbeRecord>>();
    let recorder = {
        let store = store.clone();
        tokio::spawn(async move {
            while let Some(records) = receiver.recv().await {
                let applied = store.record_probes(&records).await.expect("record");
                assert_eq!(applied.len(), records.len(), "every result stored");
            }
        })
    };
    let mut seen = HashSet::new();
    let mut empty_turns = 0;
    while empty_turns < 3 {
        let claims = store
            .claim_due(5_000, 64, "owner-a", 600_000)
            .await
            .expect("claim");
        if claims.is_empty() {
            empty_turns += 1;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        empty_turns = 0;
        let mut records = Vec::new();
        for claim in claims {
            assert!(seen.insert(claim.id.clone()), "{} claimed twice", claim.id);
            // Next due long after the claims' `now`: never due again in this test.
            records.push(ok_record(claim, 5_000, 900_000));
        }
        sender.send(records).expect("recorder runs");
    }
    drop(sender);
    recorder.await.expect("recorder");
    assert_eq!(seen.len(), 2_000, "every connection claimed once");
}

async fn a_reauth_webhook_keeps_the_auth_failure_streak(kind: Kind) {
    use connwatch::store::WebhookDelivery;
    let db = TestDb::new(kind).await;
    let store = open(&db).await;
    store
        .sync_connections(&[sync("a", 0)], 0)
        .await
        .expect("sync");
    assert_eq!(
        probe(&store, "a", Outcome::AuthFailed, 1_000).await,
        Health::Degraded
    );
    let reauth = WebhookDelivery {
        platform: "makini".into(),
        webhook_id: "msg_reauth".into(),
        received_at: 2_000,
        remote_id: "conn_a".into(),
        event_type: Some("connection.reauthorization_required".into()),
        change_id: None,
        change_updated: None,
        reauth: true,
        reconnected: false,
        body: "{}".into(),
    };
    store
        .record_webhooks(&[reauth], &RULES)
        .await
        .expect("record");
    let claim = store
        .claim_one(&id("a"), 3_000, "owner-a", 60_000)
        .await
        .expect("claim")
        .expect("claimable");
    assert_eq!(claim.state.health, Health::NeedsReauth);
    assert_eq!(
        claim.state.consecutive_auth_failures, 1,
        "the platform's word leaves the probes' streak as it was"
    );
    store.close().await;
    db.drop_postgres().await;
}

both_backends!(
    a_reauth_webhook_keeps_the_auth_failure_streak,
    claim_due_leases_each_connection_to_one_claimer,
    credential_change_opens_and_recovery_closes_an_incident,
    state_survives_reopening_the_database,
    a_record_whose_lease_was_taken_over_is_dropped,
    sync_deactivates_removed_connections_and_counts_health,
    pruning_removes_only_old_probe_history,
    steady_successes_do_not_grow_the_history,
    successive_claims_take_every_due_connection_once,
    a_webhook_batch_is_matched_deduplicated_and_marks_activity,
    a_result_for_a_connection_removed_meanwhile_is_dropped,
    claims_beside_result_commits_never_take_a_connection_twice,
);

/// The daemon's checkpoint (`Store::checkpoint`, every 500 ms beside the writers) must let
/// the WAL start over even when write transactions follow each other without a pause:
/// one that ran beside the writer always lagged a commit behind, and the WAL grew by tens
/// of MiB a second under load.
#[tokio::test]
async fn the_wal_starts_over_under_back_to_back_writes() {
    use connwatch::store::WebhookDelivery;
    let db = TestDb::new(Kind::Sqlite).await;
    let store = Store::connect_with(&db.url, 4, false)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let wal = db.path().join("connwatch.db-wal");
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut written = 0usize;
            for batch in 0..800 {
                let deliveries: Vec<WebhookDelivery> = (0..50)
                    .map(|n| WebhookDelivery {
                        platform: "makini".into(),
                        webhook_id: format!("msg_{batch}_{n}"),
                        received_at: 1_000,
                        remote_id: "nobody".into(),
                        event_type: None,
                        change_id: None,
                        change_updated: None,
                        reauth: false,
                        reconnected: false,
                        body: "x".repeat(2048),
                    })
                    .collect();
                store
                    .record_webhooks(&deliveries, &RULES)
                    .await
                    .expect("record");
                written += 50 * 2048;
            }
            written
        })
    };
    // SQLite gives the WAL header a new salt each time the log starts over (bytes 16..20).
    // Counted rather than the file's size: how large the WAL grows between two restarts
    // depends on the machine's load (a busy CI machine, a disk flush that stalls).
    let mut salts = HashSet::new();
    let mut largest = 0;
    while !writer.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        store.checkpoint().await.expect("checkpoint");
        if let Ok(mut file) = std::fs::File::open(&wal) {
            use std::io::Read;
            let mut header = [0u8; 32];
            if file.read_exact(&mut header).is_ok() {
                salts.insert(header[16..20].to_vec());
            }
            largest = largest.max(file.metadata().map(|meta| meta.len()).unwrap_or(0));
        }
    }
    let written = writer.await.expect("writer");
    assert!(
        written >= 80_000_000,
        "enough written to tell: {written} bytes"
    );
    assert!(
        salts.len() >= 3,
        "the WAL started over {} times while {written} bytes were written (largest {largest})",
        salts.len().saturating_sub(1)
    );
}
