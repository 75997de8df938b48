//! The event store against a real PostgreSQL: optimistic concurrency, one-statement batch
//! appends with outbox rows, NOTIFY, the gap-free feed and the hash chain.

use event_store::{
    Destination, Metadata, NewEvent, OutboxMessage, StoreError,
    append::Expected,
    audit::{Break, verify_all, verify_stream},
    read::FeedCursor,
};
use serde_json::json;
use shop_tests::TestDb;
use sqlx::Acquire;
use uuid::Uuid;

fn event(n: i64) -> NewEvent {
    let id = Uuid::now_v7();
    NewEvent {
        event_id: id,
        event_type: "Thing".into(),
        schema_version: 1,
        payload: json!({"n": n, "nested": {"b": 1, "a": [1, 2]}}),
        metadata: Metadata {
            correlation_id: id,
            causation_id: id,
            actor: "test".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            command_id: None,
        },
    }
}

fn outbox(stream: Uuid, n: usize) -> Vec<OutboxMessage> {
    (0..n)
        .map(|i| OutboxMessage {
            message_id: Uuid::now_v7(),
            destination: Destination::Kafka,
            target: "orders.events".into(),
            routing_key: stream.to_string(),
            ordering_key: stream.to_string(),
            headers: json!({"i": i}),
            payload: format!("m{i}").into_bytes(),
        })
        .collect()
}

/// Appends `n` events to `stream` in its own committed transaction.
pub(crate) async fn append_n(db: &TestDb, stream: Uuid, n: i64) -> Result<i64, StoreError> {
    let mut tx = db.pool.begin().await?;
    let (_, expected) = event_store::load_stream(&mut tx, stream).await?;
    let events: Vec<_> = (0..n).map(event).collect();
    let out = event_store::append(
        &mut tx,
        stream,
        "thing",
        &expected,
        &events,
        &outbox(stream, n as usize),
    )
    .await?;
    tx.commit().await?;
    Ok(out.version)
}

#[tokio::test]
async fn batch_append_writes_events_and_outbox_rows_atomically() {
    let db = TestDb::new().await;

    let stream = Uuid::now_v7();
    assert_eq!(append_n(&db, stream, 3).await.unwrap(), 3);
    assert_eq!(append_n(&db, stream, 2).await.unwrap(), 5);

    let mut conn = db.pool.acquire().await.unwrap();
    let (events, expected) = event_store::load_stream(&mut conn, stream).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(expected.version, 5);
    assert_eq!(events[0].payload["nested"]["a"], json!([1, 2]));
    assert_eq!(events[0].metadata["actor"], "test");
    let outbox_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE ordering_key = $1")
            .bind(stream.to_string())
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(outbox_rows, 5);

    // A rolled-back append leaves nothing behind, outbox included.
    let mut tx = db.pool.begin().await.unwrap();
    let (_, expected) = event_store::load_stream(&mut tx, stream).await.unwrap();
    event_store::append(
        &mut tx,
        stream,
        "thing",
        &expected,
        &[event(9)],
        &outbox(stream, 1),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let (events, _) = event_store::load_stream(&mut conn, stream).await.unwrap();
    assert_eq!(events.len(), 5);
    let outbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(outbox_rows, 5);
}

#[tokio::test]
async fn a_stale_expected_version_is_a_typed_conflict_and_writes_nothing() {
    let db = TestDb::new().await;
    let stream = Uuid::now_v7();
    append_n(&db, stream, 2).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let stale = Expected {
        version: 1,
        head_hash: vec![0; 32],
    };
    let err = event_store::append(
        &mut conn,
        stream,
        "thing",
        &stale,
        &[event(1)],
        &outbox(stream, 1),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected: 1, .. }),
        "{err:?}"
    );
    // Creating a stream that exists is a conflict too.
    let err = event_store::append(
        &mut conn,
        stream,
        "thing",
        &Expected::new_stream(),
        &[event(1)],
        &[],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected: 0, .. }),
        "{err:?}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn concurrent_appends_at_one_version_have_exactly_one_winner() {
    let db = TestDb::with_pool_size(20).await;
    let stream = Uuid::now_v7();
    append_n(&db, stream, 1).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let (_, expected) = event_store::load_stream(&mut conn, stream).await.unwrap();
    drop(conn);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (pool, expected) = (db.pool.clone(), expected.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let r = event_store::append(
                    &mut tx,
                    stream,
                    "thing",
                    &expected,
                    &[event(i)],
                    &outbox(stream, 1),
                )
                .await;
                if r.is_ok() {
                    tx.commit().await.unwrap();
                }
                r
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(out) => {
                wins += 1;
                assert_eq!(out.version, 2);
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

async fn read_whole_feed(db: &TestDb, mut cursor: FeedCursor) -> (Vec<(Uuid, i64)>, FeedCursor) {
    let mut conn = db.pool.acquire().await.unwrap();
    let mut seen = Vec::new();
    loop {
        let (events, next) = event_store::read_feed(&mut conn, cursor, 2).await.unwrap();
        if events.is_empty() {
            return (seen, cursor);
        }
        seen.extend(events.iter().map(|e| (e.stream_id, e.stream_version)));
        cursor = next;
    }
}

/// Reads the feed until `n` events have come out. The feed holds back everything younger than
/// the oldest running transaction of the whole cluster, and tests run in parallel, so events
/// may take a moment to become visible.
async fn read_feed_until(db: &TestDb, n: usize) -> (Vec<(Uuid, i64)>, FeedCursor) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut seen, mut cursor) = (Vec::new(), FeedCursor::default());
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        let (more, next) = read_whole_feed(db, cursor).await;
        seen.extend(more);
        cursor = next;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (seen, cursor)
}

#[tokio::test]
async fn the_feed_never_skips_an_event_whose_transaction_commits_late() {
    let db = TestDb::new().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());

    // T1 appends to A (taking the smaller position) and stays open...
    let mut t1 = db.pool.begin().await.unwrap();
    event_store::append(
        &mut t1,
        a,
        "thing",
        &Expected::new_stream(),
        &[event(1)],
        &[],
    )
    .await
    .unwrap();
    // ...while T2 appends to B and commits.
    append_n(&db, b, 2).await.unwrap();

    // A reader paging by position alone would now see B at positions 2..3 and move past 1.
    let (seen, cursor) = read_whole_feed(&db, FeedCursor::default()).await;
    assert!(
        seen.is_empty(),
        "feed returned {seen:?} while an older transaction is open"
    );

    assert_eq!(cursor, FeedCursor::default());
    t1.commit().await.unwrap();
    let (seen, cursor) = read_feed_until(&db, 3).await;
    assert_eq!(seen, vec![(a, 1), (b, 1), (b, 2)]);
    let (more, _) = read_whole_feed(&db, cursor).await;
    assert!(more.is_empty());
}

#[tokio::test]
async fn an_older_transaction_cannot_append_behind_a_younger_one_so_streams_stay_in_feed_order() {
    let db = TestDb::new().await;
    let (other, s) = (Uuid::now_v7(), Uuid::now_v7());

    // T1 takes its transaction id first (by writing another stream)...
    let mut t1 = db.pool.begin().await.unwrap();
    event_store::append(
        &mut t1,
        other,
        "thing",
        &Expected::new_stream(),
        &[event(0)],
        &[],
    )
    .await
    .unwrap();
    // ...T2 (younger) creates S and commits...
    append_n(&db, s, 1).await.unwrap();
    // ...T1 then tries to append S v2 on top: refused, because the feed orders by
    // transaction id and would list v2 before v1.
    let conn = t1.acquire().await.unwrap();
    let (_, expected) = event_store::load_stream(conn, s).await.unwrap();
    assert_eq!(expected.version, 1);
    let err = event_store::append(conn, s, "thing", &expected, &[event(2)], &[])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    t1.rollback().await.unwrap();

    // Retried in a new transaction it succeeds, and the feed has S in version order.
    append_n(&db, s, 1).await.unwrap();
    let (seen, _) = read_feed_until(&db, 2).await;
    let s_versions: Vec<i64> = seen
        .iter()
        .filter(|(id, _)| *id == s)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(s_versions, [1, 2]);
}

#[tokio::test]
async fn the_hash_chain_detects_edits_deletions_reordering_and_truncation() {
    let db = TestDb::new().await;
    // Corrupts events on purpose, as their owner could.
    db.allow_tampering().await;
    let streams: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    for s in &streams {
        append_n(&db, *s, 2).await.unwrap();
        append_n(&db, *s, 2).await.unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let (broken, checked) = verify_all(&mut conn, None).await.unwrap();
    assert_eq!((broken.len(), checked), (0, 5));

    let exec = |sql: &'static str, s: Uuid| {
        let pool = db.pool.clone();
        async move { sqlx::query(sql).bind(s).execute(&pool).await.unwrap() }
    };
    // Edit a payload.
    exec("UPDATE events SET payload = jsonb_set(payload, '{n}', '99') WHERE stream_id = $1 AND stream_version = 2", streams[0]).await;
    // Delete an event in the middle.
    exec(
        "DELETE FROM events WHERE stream_id = $1 AND stream_version = 2",
        streams[1],
    )
    .await;
    // Reorder two events (swap their versions).
    exec(
        "UPDATE events SET stream_version = 100 WHERE stream_id = $1 AND stream_version = 2",
        streams[2],
    )
    .await;
    exec(
        "UPDATE events SET stream_version = 2 WHERE stream_id = $1 AND stream_version = 3",
        streams[2],
    )
    .await;
    exec(
        "UPDATE events SET stream_version = 3 WHERE stream_id = $1 AND stream_version = 100",
        streams[2],
    )
    .await;
    // Delete the newest event.
    exec(
        "DELETE FROM events WHERE stream_id = $1 AND stream_version = 4",
        streams[3],
    )
    .await;

    let problem = |r: event_store::audit::StreamReport| {
        let b = r.broken.expect("tampering not detected");
        (b.stream_version, b.problem)
    };
    assert_eq!(
        problem(verify_stream(&mut conn, streams[0]).await.unwrap()),
        (2, Break::ContentChanged)
    );
    assert_eq!(
        problem(verify_stream(&mut conn, streams[1]).await.unwrap()),
        (3, Break::VersionGap { expected: 2 })
    );
    let (v, p) = problem(verify_stream(&mut conn, streams[2]).await.unwrap());
    assert_eq!(v, 2);
    assert!(
        matches!(p, Break::ChainBroken | Break::ContentChanged),
        "{p:?}"
    );
    assert_eq!(
        problem(verify_stream(&mut conn, streams[3]).await.unwrap()),
        (4, Break::Truncated { head_version: 4 })
    );
    assert!(
        verify_stream(&mut conn, streams[4])
            .await
            .unwrap()
            .broken
            .is_none()
    );
    let (broken, checked) = verify_all(&mut conn, Some("thing")).await.unwrap();
    assert_eq!((broken.len(), checked), (4, 5));
}

#[tokio::test]
async fn events_are_append_only_at_the_database() {
    let db = TestDb::new().await;
    let s = Uuid::now_v7();
    append_n(&db, s, 2).await.unwrap();
    for sql in [
        "UPDATE events SET payload = '{}' WHERE stream_id = $1",
        "DELETE FROM events WHERE stream_id = $1",
    ] {
        let e = sqlx::query(sql)
            .bind(s)
            .execute(&db.pool)
            .await
            .unwrap_err();
        let code = e.as_database_error().and_then(|d| d.code()).unwrap();
        assert_eq!(code, "42501", "{sql}: {e}");
        assert!(e.to_string().contains("append-only"), "{e}");
    }
    let e = sqlx::query("TRUNCATE events CASCADE")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, 2);
}

/// Each kind of tampering, on a stream of its own, after a signed checkpoint: the keyed
/// chain or the checkpoint (or both) report it, in the library and through `shop audit
/// verify --checkpoint`; an edited checkpoint is refused.
#[tokio::test]
async fn a_signed_checkpoint_and_the_keyed_chain_reveal_every_kind_of_tampering() {
    use event_store::checkpoint::{self, Finding};
    let db = TestDb::new().await;
    let kinds = [
        "edited",
        "reordered",
        "inserted",
        "deleted in the middle",
        "deleted tail",
        "deleted stream",
        "recomputed chain",
    ];
    let streams: Vec<Uuid> = kinds.iter().map(|_| Uuid::now_v7()).collect();
    for s in &streams {
        append_n(&db, *s, 4).await.unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let cp = checkpoint::take(&mut conn).await.unwrap();
    assert!(cp.keyed_from.is_some(), "appends are keyed");
    assert_eq!(checkpoint::compare(&mut conn, &cp).await.unwrap(), []);
    let dir = std::env::temp_dir().join(format!("checkpoints-{}", Uuid::now_v7()));
    let file = shop::audit::write(&dir, &cp).unwrap();

    db.allow_tampering().await;
    let exec = |sql: &'static str, s: Uuid| {
        let pool = db.pool.clone();
        async move { sqlx::query(sql).bind(s).execute(&pool).await.unwrap() }
    };
    let [
        edited,
        reordered,
        inserted,
        middle,
        tail,
        deleted,
        recomputed,
    ] = streams[..]
    else {
        unreachable!()
    };
    exec("UPDATE events SET payload = jsonb_set(payload, '{n}', '99') WHERE stream_id = $1 AND stream_version = 2", edited).await;
    exec("UPDATE events SET stream_version = stream_version + 100 WHERE stream_id = $1 AND stream_version IN (2, 3)", reordered).await;
    exec("UPDATE events SET stream_version = 105 - stream_version WHERE stream_id = $1 AND stream_version IN (102, 103)", reordered).await;
    // A forged event at version 3, the later ones moved up, the head moved with them.
    exec("UPDATE events SET stream_version = stream_version + 10 WHERE stream_id = $1 AND stream_version >= 3", inserted).await;
    exec("UPDATE events SET stream_version = stream_version - 9 WHERE stream_id = $1 AND stream_version >= 13", inserted).await;
    exec("INSERT INTO events (stream_id, stream_type, stream_version, event_id, event_type, schema_version, payload, metadata, recorded_at, prev_hash, hash, hash_kid)
          SELECT stream_id, stream_type, 3, gen_random_uuid(), event_type, 1, '{\"n\": 1000}', metadata, recorded_at, hash, hash, hash_kid
          FROM events WHERE stream_id = $1 AND stream_version = 2", inserted).await;
    exec(
        "UPDATE streams SET version = 5 WHERE stream_id = $1",
        inserted,
    )
    .await;
    exec(
        "DELETE FROM events WHERE stream_id = $1 AND stream_version = 2",
        middle,
    )
    .await;
    // The tail cut consistently: the head row moved back to the new last event.
    exec(
        "DELETE FROM events WHERE stream_id = $1 AND stream_version = 4",
        tail,
    )
    .await;
    exec("UPDATE streams s SET version = 3, head_hash = e.hash FROM events e WHERE s.stream_id = $1 AND e.stream_id = $1 AND e.stream_version = 3", tail).await;
    exec("DELETE FROM events WHERE stream_id = $1", deleted).await;
    exec("DELETE FROM streams WHERE stream_id = $1", deleted).await;
    // An edit, then the whole chain recomputed from the database's contents alone (no key).
    exec("UPDATE events SET payload = jsonb_set(payload, '{n}', '99') WHERE stream_id = $1 AND stream_version = 2", recomputed).await;
    let (events, _) = event_store::load_stream(&mut conn, recomputed)
        .await
        .unwrap();
    let mut prev = event_store::hash::GENESIS.to_vec();
    for e in &events {
        let hash = event_store::hash::chain_hash(&prev, &e.hash_input());
        sqlx::query(
            "UPDATE events SET prev_hash = $2, hash = $3, hash_kid = NULL WHERE event_id = $1",
        )
        .bind(e.event_id)
        .bind(&prev)
        .bind(&hash)
        .execute(&db.pool)
        .await
        .unwrap();
        prev = hash;
    }
    sqlx::query("UPDATE streams SET head_hash = $2 WHERE stream_id = $1")
        .bind(recomputed)
        .bind(&prev)
        .execute(&db.pool)
        .await
        .unwrap();

    // What the keyed chain sees by itself, per stream.
    let (broken, _) = verify_all(&mut conn, None).await.unwrap();
    let chain: std::collections::HashMap<Uuid, Break> = broken
        .into_iter()
        .map(|r| (r.stream_id, r.broken.unwrap().problem))
        .collect();
    // What the checkpoint adds.
    let findings = checkpoint::compare(&mut conn, &cp).await.unwrap();
    let found = |s: Uuid| -> Vec<&Finding> {
        findings
            .iter()
            .filter(|f| match f {
                Finding::StreamDeleted { stream_id }
                | Finding::Truncated { stream_id, .. }
                | Finding::Rewritten { stream_id, .. }
                | Finding::Unkeyed { stream_id, .. } => *stream_id == s,
                Finding::BadSignature => false,
            })
            .collect()
    };
    for (kind, s) in kinds.iter().zip(&streams) {
        assert!(
            chain.contains_key(s) || !found(*s).is_empty(),
            "{kind}: not detected"
        );
    }
    assert_eq!(chain[&edited], Break::ContentChanged);
    assert_eq!(chain[&reordered], Break::ChainBroken);
    assert!(chain.contains_key(&inserted), "inserted: {chain:?}");
    assert!(matches!(chain[&middle], Break::VersionGap { .. }));
    // A consistent rewrite without the key: unkeyed events after keyed ones elsewhere.
    assert_eq!(chain[&recomputed], Break::Downgraded);
    // Invisible to the chain alone, visible against the checkpoint:
    assert!(!chain.contains_key(&tail) && !chain.contains_key(&deleted));
    assert!(matches!(
        found(tail)[..],
        [Finding::Truncated { now: 3, .. }]
    ));
    assert!(matches!(
        found(deleted)[..],
        [Finding::StreamDeleted { .. }]
    ));
    assert!(
        found(recomputed)
            .iter()
            .any(|f| matches!(f, Finding::Rewritten { .. }))
    );
    assert!(
        found(recomputed)
            .iter()
            .any(|f| matches!(f, Finding::Unkeyed { .. }))
    );

    // The same through the operator's command.
    let verify = |checkpoint: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shop"))
            .args(["audit", "verify", "--checkpoint"])
            .arg(checkpoint)
            .env("DATABASE_URL", &db.url)
            .env("AUDIT_KEYS", shop_tests::TEST_AUDIT_KEYS)
            .env_remove("AUDIT_KEYS_FILE")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&file);
    assert_eq!(code, Some(1), "{out}");
    for expect in [
        format!("BROKEN stream {edited}"),
        format!("CHECKPOINT StreamDeleted {deleted}"),
        format!("CHECKPOINT Truncated {tail}"),
        format!("CHECKPOINT Rewritten {recomputed}"),
        format!("CHECKPOINT Unkeyed {recomputed}"),
    ] {
        assert!(out.contains(&expect), "{expect}:\n{out}");
    }
    // A checkpoint edited to match the tampered database no longer verifies.
    let mut forged = cp.clone();
    forged.streams.retain(|s| s.stream_id != deleted);
    let forged_file = dir.join("forged.json");
    std::fs::write(&forged_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let (code, out) = verify(&forged_file);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("CHECKPOINT BadSignature"), "{out}");
    std::fs::remove_dir_all(dir).ok();
}

/// Several streams in one statement: each is written if and only if it is at its expected
/// version; a conflicting one leaves no event and no outbox row, and costs the others nothing.
#[tokio::test]
async fn append_many_writes_exactly_the_streams_at_their_expected_version() {
    let db = TestDb::new().await;
    let (at_two, fresh, stale) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    append_n(&db, at_two, 2).await.unwrap();
    append_n(&db, stale, 1).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let (_, two) = event_store::load_stream(&mut conn, at_two).await.unwrap();
    let new_stream = Expected::new_stream();
    let (e1, e2, e3) = ([event(3), event(4)], [event(1)], [event(2)]);
    let (o1, o2, o3) = (outbox(at_two, 2), outbox(fresh, 1), outbox(stale, 1));
    let at = event_store::now_micros();
    let append = |stream_id, expected, events, outbox| event_store::Append {
        stream_id,
        stream_type: "thing",
        expected,
        events,
        outbox,
        recorded_at: at,
    };
    let mut tx = db.pool.begin().await.unwrap();
    let outcomes = event_store::append_many(
        &mut tx,
        &[
            append(at_two, &two, &e1, &o1),
            append(fresh, &new_stream, &e2, &o2),
            // `stale` exists: creating it again is a conflict.
            append(stale, &new_stream, &e3, &o3),
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap().version, 4);
    assert_eq!(outcomes[1].as_ref().unwrap().version, 1);
    assert!(
        matches!(outcomes[2], Err(StoreError::Conflict { stream_id, expected: 0 }) if stream_id == stale),
        "{:?}",
        outcomes[2]
    );
    for (stream, events, outbox_rows) in [(at_two, 4, 4), (fresh, 1, 1), (stale, 1, 1)] {
        let (stored, head) = event_store::load_stream(&mut conn, stream).await.unwrap();
        assert_eq!((stored.len(), head.version), (events, events as i64));
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE ordering_key = $1")
            .bind(stream.to_string())
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(rows, outbox_rows, "{stream}");
        let report = verify_stream(&mut conn, stream).await.unwrap();
        assert!(report.broken.is_none(), "{report:?}");
    }
    // The returned head is the stored head: the next append chains onto it.
    let next = outcomes[0].as_ref().unwrap();
    let expected = Expected {
        version: next.version,
        head_hash: next.head_hash.clone(),
    };
    event_store::append(&mut conn, at_two, "thing", &expected, &[event(5)], &[])
        .await
        .unwrap();
    assert!(
        verify_stream(&mut conn, at_two)
            .await
            .unwrap()
            .broken
            .is_none()
    );
}

fn job(stream_id: Uuid, events: Vec<NewEvent>) -> event_store::group::AppendJob {
    event_store::group::AppendJob {
        stream_id,
        stream_type: "thing".into(),
        expected: Expected::new_stream(),
        outbox: outbox(stream_id, events.len()),
        events,
        recorded_at: event_store::now_micros(),
    }
}

/// Group commit: what waits while a batch is written goes into the next transaction together;
/// two jobs on one stream never share one (one wins, one conflicts); a job that breaks a unique
/// key makes its batch fail, and then fails alone while its batch-mates are written.
#[tokio::test]
async fn group_commit_shares_transactions_and_isolates_conflicts_and_failures() {
    use event_store::group::{Appends, CommitError, Committer};
    let db = TestDb::with_pool_size(4).await;
    let committer = Committer::start(db.pool.clone(), Appends, 1, 8);

    // Hold the one worker: its first job waits for a row lock of an open transaction.
    let blocker = Uuid::now_v7();
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO streams (stream_id, stream_type, version, head_hash, last_tx) VALUES ($1, 'thing', 1, $2, pg_current_xact_id())")
        .bind(blocker)
        .bind(vec![0u8; 32])
        .execute(&mut *holder)
        .await
        .unwrap();
    let first = tokio::spawn({
        let c = committer.clone();
        async move { c.submit(job(blocker, vec![event(1)])).await }
    });
    while committer.waiting() > 0 || !first_taken(&db).await {
        tokio::task::yield_now().await;
    }

    // Meanwhile: 12 new streams, two jobs on one more stream, and a job reusing a stored
    // event's id (the events' unique key refuses it).
    let stored = Uuid::now_v7();
    append_n(&db, stored, 1).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let (taken, _) = event_store::load_stream(&mut conn, stored).await.unwrap();
    let mut reused = event(1);
    reused.event_id = taken[0].event_id;
    let streams: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    let twice = Uuid::now_v7();
    let bad = Uuid::now_v7();
    let mut jobs: Vec<_> = streams.iter().map(|s| job(*s, vec![event(1)])).collect();
    jobs.insert(3, job(twice, vec![event(1)]));
    jobs.insert(5, job(twice, vec![event(2)]));
    jobs.push(job(bad, vec![reused]));
    let n = jobs.len();
    let waiting: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            let c = committer.clone();
            let stream = j.stream_id;
            tokio::spawn(async move { (stream, c.submit(j).await) })
        })
        .collect();
    while committer.waiting() < n {
        tokio::task::yield_now().await;
    }
    holder.commit().await.unwrap();

    let blocked = first.await.unwrap().unwrap();
    assert!(
        matches!(blocked, Err(StoreError::Conflict { .. })),
        "{blocked:?}"
    );
    let (mut written, mut conflicts, mut failed) = (Vec::new(), 0, Vec::new());
    for w in waiting {
        match w.await.unwrap() {
            (s, Ok(Ok(out))) => {
                assert_eq!(out.version, 1);
                written.push(s);
            }
            (s, Ok(Err(StoreError::Conflict { .. }))) => {
                assert_eq!(s, twice);
                conflicts += 1;
            }
            (s, Err(CommitError::Database(_))) => failed.push(s),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failed, [bad]);
    assert_eq!(conflicts, 1);
    assert_eq!(written.len(), 13);
    assert!(written.contains(&twice));
    for s in &streams {
        assert!(written.contains(s), "{s} was not written");
    }
    // Nothing of the failed job, one event of the doubled stream, and new streams sharing a
    // transaction (the queue went in batches of at most 8: whichever batch the failing job
    // was not in held at least 5 of them).
    let (bad_events, twice_events): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE stream_id = $1), count(*) FILTER (WHERE stream_id = $2) FROM events",
    )
    .bind(bad)
    .bind(twice)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!((bad_events, twice_events), (0, 1));
    let shared: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM streams WHERE stream_id = ANY($1) GROUP BY last_tx::text) t",
    )
    .bind(&streams)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(shared >= 5, "at most {shared} streams shared a transaction");
}

/// Whether the committer's worker has taken the blocker's job (it waits for the lock).
async fn first_taken(db: &TestDb) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database())",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}
