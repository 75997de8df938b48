//! Smoke tests of the local services, through the same clients and settings the product uses.
//! They fail (never skip) when a service is missing.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{Header, Headers, OwnedHeaders},
    producer::FutureRecord,
};
use shop_tests::{TestDb, TestKafka, TestRabbit};

#[tokio::test]
async fn migrations_apply_and_are_idempotent() {
    let db = TestDb::new().await;
    for table in ["events", "outbox", "idempotency_keys"] {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            found.as_deref(),
            Some(table),
            "table {table} missing after migrations"
        );
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, platform::db::MIGRATOR.iter().count());
    // A second run applies nothing and fails nothing.
    platform::db::migrate(&db.pool).await.unwrap();
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(again, applied);
    // A database already migrated by a newer build (an unknown later migration) is accepted.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (999999, 'from a newer build', true, '\\x00', 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    platform::db::migrate(&db.pool)
        .await
        .expect("newer applied migrations are tolerated");
}

#[tokio::test]
async fn kafka_keyed_messages_with_headers_round_trip_through_a_consumer_group() {
    let mut kafka = TestKafka::new().await;
    let topic = kafka.create_topics(&["smoke"], 3).await.remove(0);
    let producer = platform::kafka::producer(&kafka.brokers).unwrap();

    // 3 keys x 10 messages, each carrying its key and sequence number in headers.
    let mut sent = 0;
    for seq in 0..10 {
        for key in ["order-a", "order-b", "order-c"] {
            let payload = format!("{key}:{seq}");
            let seq_s = seq.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "event_type",
                    value: Some("Smoke"),
                })
                .insert(Header {
                    key: "seq",
                    value: Some(seq_s.as_str()),
                });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("delivery report");
            sent += 1;
        }
    }

    let group = format!("{}smoke-group", kafka.prefix);
    let consumer: StreamConsumer = platform::kafka::consumer_config(&kafka.brokers, &group)
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();

    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for _ in 0..sent {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message within 30 s")
            .unwrap();
        let key = std::str::from_utf8(msg.key().unwrap()).unwrap().to_owned();
        let headers = msg.headers().expect("headers");
        let get = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| std::str::from_utf8(v).unwrap().to_owned())
        };
        assert_eq!(get("event_type").as_deref(), Some("Smoke"));
        let seq: u32 = get("seq").unwrap().parse().unwrap();
        let payload = std::str::from_utf8(msg.payload().unwrap()).unwrap();
        assert_eq!(payload, format!("{key}:{seq}"));
        per_key.entry(key).or_default().push(seq);
        consumer.commit_message(&msg, CommitMode::Sync).unwrap();
    }
    assert_eq!(per_key.len(), 3);
    for (key, seqs) in &per_key {
        assert_eq!(
            seqs,
            &(0..10).collect::<Vec<_>>(),
            "per-key order broken for {key}"
        );
    }

    // The manual commits are what the group has stored: for every partition the committed
    // offset equals the end of the log.
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let mut total = 0;
    for elem in committed.elements() {
        let (_, high) = consumer
            .fetch_watermarks(&topic, elem.partition(), Duration::from_secs(10))
            .unwrap();
        match elem.offset() {
            Offset::Offset(o) => assert_eq!(o, high, "partition {}", elem.partition()),
            other => assert_eq!(
                high,
                0,
                "partition {} has no commit: {other:?}",
                elem.partition()
            ),
        }
        total += high;
    }
    assert_eq!(total, sent as i64);
}

#[tokio::test]
async fn rabbitmq_confirmed_persistent_messages_round_trip_through_a_quorum_queue() {
    let rabbit = TestRabbit::new().await;
    let queue = rabbit.name("smoke");
    let ch = platform::amqp::confirm_channel(&rabbit.conn).await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        platform::amqp::quorum_queue_args(),
    )
    .await
    .unwrap();

    for i in 0..20 {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                format!("msg-{i}").as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(format!("id-{i}").into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "broker did not ack message {i}");
        assert!(
            confirm.take_message().is_none(),
            "message {i} was returned as unroutable"
        );
    }

    // An unroutable mandatory publish comes back instead of vanishing.
    let confirm = ch
        .basic_publish(
            "".into(),
            rabbit.name("no-such-queue").as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost?",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.take_message().is_some(),
        "unroutable message was not returned"
    );

    let consumer_ch = platform::amqp::consumer_channel(&rabbit.conn, 10)
        .await
        .unwrap();
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "smoke".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..20 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("delivery within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.data, format!("msg-{i}").into_bytes());
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some(format!("id-{i}").as_str())
        );
        assert_eq!(*delivery.properties.delivery_mode(), Some(2));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Everything was acked: the queue is empty.
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    consumer_ch.close(200, "done".into()).await.ok();
    rabbit.delete_queues(&[queue]).await;
}

/// TLS to PostgreSQL through the product's own pool settings (`platform::db`): encrypted on
/// request, verified against the CA given in the URL, refused against the wrong CA. The
/// local server is Debian's, with its self-signed `snakeoil` certificate.
#[tokio::test]
async fn postgres_connections_can_be_tls_and_are_verified() {
    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let db = TestDb::new().await;
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let tls_in_use = |url: String| async move {
        let pool =
            platform::db::connect_bounded(&url, "shop:tls-test", 1, Duration::from_secs(5)).await?;
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await?;
        pool.close().await;
        Ok::<bool, sqlx::Error>(ssl)
    };
    assert!(
        !tls_in_use(format!("{}{sep}sslmode=disable", db.url))
            .await
            .unwrap()
    );
    assert!(
        tls_in_use(format!("{}{sep}sslmode=require", db.url))
            .await
            .unwrap()
    );
    // Verified: the certificate is signed by the CA given (the self-signed one itself) and
    // names the host connected to (`localhost`).
    let by_name = db.url.replacen("@127.0.0.1:", "@localhost:", 1);
    assert_ne!(by_name, db.url);
    assert!(
        tls_in_use(format!(
            "{by_name}{sep}sslmode=verify-full&sslrootcert={SNAKEOIL}"
        ))
        .await
        .unwrap()
    );
    // Refused: a certificate for another host name. (A wrong CA cannot be shown here: the
    // system's CA store, which rustls reads from /etc/ssl/certs, holds Debian's snakeoil
    // certificate itself.)
    let by_ip = format!("{}{sep}sslmode=verify-full&sslrootcert={SNAKEOIL}", db.url);
    let refused = tls_in_use(by_ip)
        .await
        .expect_err("a certificate for another name");
    assert!(
        refused.to_string().contains("not valid for name"),
        "{refused}"
    );
}

/// TLS to RabbitMQ through the product's own connect (`platform::amqp`): an `amqps://` URL
/// is encrypted and verified (the local broker's TLS listener has the `localhost` snakeoil
/// certificate, `scripts/rabbitmq.sh`), a certificate for another name is refused, the
/// `cacertfile` a URL names is read, and the TLS port speaks nothing else.
#[tokio::test]
async fn rabbitmq_connections_can_be_tls_and_are_verified() {
    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let url = std::env::var("AMQP_TLS_URL")
        .unwrap_or_else(|_| "amqps://guest:guest@localhost:5671/%2f".into());
    let connect = |url: String| async move {
        let conn = platform::amqp::connect(&url, "shop-tls-test").await?;
        let ch = conn.create_channel().await?;
        ch.close(200, "done".into()).await?;
        conn.close(200, "done".into()).await?;
        Ok::<(), platform::amqp::AmqpError>(())
    };
    connect(url.clone()).await.expect("amqps to localhost");
    connect(format!("{url}?cacertfile={SNAKEOIL}"))
        .await
        .expect("amqps with the CA named in the URL");
    let missing = connect(format!("{url}?cacertfile=/nonexistent/ca.pem"))
        .await
        .expect_err("a CA file that is not there");
    assert!(missing.to_string().contains("cacertfile"), "{missing}");
    let by_ip = url.replacen("@localhost:", "@127.0.0.1:", 1);
    assert_ne!(by_ip, url);
    let refused = connect(by_ip)
        .await
        .expect_err("a certificate for another name");
    assert!(
        refused.to_string().contains("NotValidForName")
            || refused.to_string().contains("not valid for name"),
        "{refused}"
    );
    let plain = url.replacen("amqps://", "amqp://", 1);
    let plain = tokio::time::timeout(Duration::from_secs(30), connect(plain)).await;
    assert!(!matches!(plain, Ok(Ok(()))), "plain AMQP on the TLS port");
}

/// Each of `shop run`'s pools has a `statement_timeout`: PostgreSQL itself stops a statement
/// that runs away, whatever the client does.
#[tokio::test]
async fn a_pools_statement_timeout_is_enforced_by_postgres() {
    let db = TestDb::new().await;
    let pool =
        platform::db::connect_bounded(&db.url, "shop:queries", 1, Duration::from_millis(200))
            .await
            .unwrap();
    let e = sqlx::query("SELECT pg_sleep(5)")
        .execute(&pool)
        .await
        .unwrap_err();
    let code = e.as_database_error().and_then(|d| d.code());
    assert_eq!(code.as_deref(), Some("57014"), "{e}");
    let name: String = sqlx::query_scalar("SELECT current_setting('application_name')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(name, "shop:queries");
}
