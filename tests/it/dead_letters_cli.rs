//! `callfleet dead-letters`, as an operator runs it against a fleet's RabbitMQ: options
//! before or after the verb, a large parking lot listed in one go, clear answers when there
//! is nothing to show, an unknown id or a wrong prefix, and nothing declared by looking.

use std::process::Output;

use callfleet_core::ports::{Broker, Message, WorkQueue};

use crate::harness::{amqp_url, rabbit_broker, raw_channel, CleanOnDrop};

async fn cli(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .arg("dead-letters")
        .args(args)
        .env("CALLFLEET_AMQP_URL", amqp_url())
        .env_remove("CALLFLEET_BROKER")
        .env_remove("CALLFLEET_QUEUE_PREFIX")
        .output()
        .await
        .expect("run callfleet dead-letters")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_and_purged_as_an_operator_expects() {
    const MANY: usize = 5_000;
    let (broker, prefix) = rabbit_broker("dlq-cli", 3).await;
    let _clean = CleanOnDrop(prefix.clone());
    // A large parking lot, published straight to the dead-letter exchange.
    let (conn, ch) = raw_channel().await;
    let mut confirms = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "x-callfleet-dead-reason".into(),
            lapin::types::AMQPValue::LongString(b"handler: undecodable".to_vec().into()),
        );
        headers.insert(
            "x-callfleet-dead-queue".into(),
            lapin::types::AMQPValue::LongString(b"webhook_events".to_vec().into()),
        );
        confirms.push(
            ch.basic_publish(
                format!("{prefix}.dlx").as_str().into(),
                "".into(),
                Default::default(),
                b"{}",
                lapin::BasicProperties::default()
                    .with_message_id(format!("bulk-{i}").as_str().into())
                    .with_headers(headers),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        c.await.expect("confirm");
    }
    let _ = conn.close(200, "done".into()).await;
    let one = Message::new(
        WorkQueue::CallJobs,
        &b"{\"call_id\":\"call_x\",\"attempt\":1}"[..],
    );
    broker
        .dead_letter(one.clone(), "retries exhausted: LiveKit unreachable")
        .await
        .expect("park");

    // Options after the verb; every dead letter listed, one JSON line each.
    let listing = std::time::Instant::now();
    let out = cli(&["list", "--limit", "100000", "--queue-prefix", &prefix]).await;
    println!(
        "listed {} dead letters in {:?}",
        MANY + 1,
        listing.elapsed()
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = text(&out.stdout);
    assert_eq!(lines.lines().count(), MANY + 1);
    assert!(lines.contains("retries exhausted: LiveKit unreachable"));
    // Listing takes nothing away (once the listed ones are counted as ready again).
    crate::broker_conformance::assert_census(broker.as_ref(), &[("dead", MANY as u64 + 1)]).await;

    // An unknown id is an error; a known one goes back to its queue.
    let out = cli(&["--queue-prefix", &prefix, "replay", "--id", "no-such-id"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no dead letter with id no-such-id"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["replay", "--id", &one.id, "--queue-prefix", &prefix]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("replayed 1"));
    crate::broker_conformance::assert_census(
        broker.as_ref(),
        &[("call_jobs", 1), ("dead", MANY as u64)],
    )
    .await;

    // Purged, the list says it is empty.
    let out = cli(&["purge", "--queue-prefix", &prefix]).await;
    assert!(
        text(&out.stdout).contains(&format!("purged {MANY}")),
        "{}",
        text(&out.stdout)
    );
    let out = cli(&["list", "--queue-prefix", &prefix]).await;
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("no dead letters"),
        "{}",
        text(&out.stderr)
    );

    // The memory broker has no parking lot to inspect from outside.
    let out = cli(&["--broker", "memory", "list"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("RabbitMQ"),
        "{}",
        text(&out.stderr)
    );

    // A wrong prefix is named, and looking declares nothing.
    let missing = format!("{prefix}-typo");
    let out = cli(&["list", "--queue-prefix", &missing]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("{missing}.dead")),
        "{}",
        text(&out.stderr)
    );
    let (conn, ch) = raw_channel().await;
    let passive = ch
        .queue_declare(
            format!("{missing}.dead").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    assert!(passive.is_err(), "the typo's queue was created");
    let _ = conn.close(200, "done".into()).await;
}
