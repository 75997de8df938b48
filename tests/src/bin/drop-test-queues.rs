//! Deletes RabbitMQ queues left by interrupted test runs: `scripts/test.sh` feeds it the
//! names `rabbitmqctl list_queues` prints, and it deletes those that carry a test prefix
//! (`t` and 12 hex digits, then a dot: `shop_tests::unique_prefix`).
//!
//! Why: every test that starts `shop run` declares its own durable quorum queues; a test
//! binary that dies (or a test that does not clean up) leaves them, and a broker holding
//! hundreds of quorum queues slows down until declarations time out. One AMQP connection
//! deletes them in seconds where one `rabbitmqctl delete_queue` per queue takes minutes.

use std::io::BufRead;

use lapin::options::QueueDeleteOptions;

/// `t3f9a0c1b2d4e.`: what `shop_tests::unique_prefix` makes, plus the separator.
fn is_test_queue(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() > 14
        && bytes[0] == b't'
        && bytes[1..13]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && bytes[13] == b'.'
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let names: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| is_test_queue(l))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let url = shop_tests::infra().amqp_url;
    let conn = platform::amqp::connect(&url, "drop-test-queues").await?;
    let ch = conn.create_channel().await?;
    for name in &names {
        ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    conn.close(200, "done".into()).await.ok();
    println!("deleted {} stale test queue(s)", names.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_with_a_test_prefix_are_test_queues() {
        let prefix = shop_tests::unique_prefix();
        assert!(is_test_queue(&format!("{prefix}.checkout.inventory")));
        assert!(!is_test_queue("checkout.inventory"));
        assert!(!is_test_queue("checkout.shipping.retry.400ms"));
        assert!(!is_test_queue("tXYZ00000000.checkout"));
        assert!(!is_test_queue(&prefix));
    }
}
