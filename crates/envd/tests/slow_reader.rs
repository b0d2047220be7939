//! A chatty process whose client stops reading must not grow envd's memory:
//! output is held in bounded channels and the process is slowed down instead
//! (the slow-reader policy in `envd::process`).

mod common;

use std::time::Duration;

use common::{json_envelope, within, Envd, CONNECT_JSON};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_stalled_reader_does_not_grow_memory() {
    let mut envd = Envd::start();
    let baseline = rss_kib(envd.pid());
    // Start `yes` and never read the response.
    let body = json_envelope(&json!({
        "process": {"cmd": "/usr/bin/yes", "args": ["0123456789abcdef0123456789abcdef"]},
        "stdin": false,
        "tag": "chatty",
    }));
    let mut sock = TcpStream::connect(envd.addr()).await.unwrap();
    let head = format!(
        "POST /process.Process/Start HTTP/1.1\r\nHost: envd\r\nContent-Type: {CONNECT_JSON}\r\nConnect-Protocol-Version: 1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&body).await.unwrap();
    // Let `yes` run flat out against the stalled reader.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss_kib(envd.pid()).saturating_sub(baseline);
    // 256 events of at most 32 KiB per subscriber, plus socket buffers and
    // allocator slack: far below what 3 s of `yes` (GBs) would need.
    assert!(
        grown < 64 * 1024,
        "envd grew by {grown} KiB with a stalled reader"
    );

    // envd still answers, and the chatty process can be killed.
    let http = envd.http1();
    let list = http
        .unary("/process.Process/List", &json!({}), &[])
        .await
        .json();
    let pid = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tag"] == "chatty")
        .and_then(|p| p["pid"].as_u64())
        .expect("yes is listed");
    within(
        "kill",
        Duration::from_secs(10),
        http.unary(
            "/process.Process/SendSignal",
            &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            &[],
        ),
    )
    .await
    .expect_status(http::StatusCode::OK);
    drop(sock);
    envd.assert_healthy().await;
}
