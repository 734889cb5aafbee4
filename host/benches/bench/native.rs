//! The baseline a user would write instead of cachepol: a hand-written
//! native daemon doing ttl-table's job with no sandbox, no grants, no
//! queues, no echo suppression and no audit.
//!
//! It speaks RESP3 on one connection subscribed to the write ops' keyevent
//! channels; each notification for a key matching a row (first match wins)
//! becomes `EXPIRE key ttl NX` on a second connection, pipelined: whatever
//! arrived while the previous batch was in flight goes out as the next one.
//! It runs as a process of its own (the bench binary started with
//! [`FLAG`]), so its CPU time is measured the same way as the daemon's.

use std::time::Duration;

use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};

/// Run the bench binary as the native daemon: `--native-ttl-daemon URL`.
pub const FLAG: &str = "--native-ttl-daemon";

/// The rows, as ttl-table is configured in the events scenario.
const ROWS: [(&str, u64); 3] = [("ev:", 3600), ("lat:", 3600), ("job:", 86_400)];

/// Ops that count as a write (the subset the scenarios produce).
const OPS: [&str; 1] = ["set"];

/// A batch is sent once this big even if more is waiting.
const MAX_BATCH: usize = 1000;

/// Run until killed.
pub fn main(url: &str) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(serve(url))
}

async fn serve(url: &str) -> ! {
    let client = redis::Client::open(format!("{url}?protocol=resp3")).expect("a Redis URL");
    assert_eq!(client.get_connection_info().redis_settings().protocol(), ProtocolVersion::RESP3);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
    let config = AsyncConnectionConfig::new().set_push_sender(tx);
    let mut subscriber = client.get_multiplexed_async_connection_with_config(&config).await.expect("connect");
    let channels: Vec<String> = OPS.iter().map(|op| format!("__keyevent@0__:{op}")).collect();
    subscriber.subscribe(channels).await.expect("subscribe");
    let mut writer = client.get_multiplexed_async_connection().await.expect("connect");
    eprintln!("native ttl daemon ready");
    loop {
        let Some(first) = rx.recv().await else {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            continue;
        };
        let mut pipe = redis::pipe();
        let mut batched = add(&mut pipe, first);
        while batched < MAX_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            batched += add(&mut pipe, next);
        }
        if batched > 0 {
            pipe.query_async::<()>(&mut writer).await.expect("EXPIRE batch");
        }
    }
}

/// `EXPIRE key ttl NX` for a notification of a key a row matches.
fn add(pipe: &mut redis::Pipeline, push: PushInfo) -> usize {
    if push.kind != PushKind::Message {
        return 0;
    }
    let [_, Value::BulkString(key)] = push.data.as_slice() else { return 0 };
    let Some((_, ttl)) = ROWS.iter().find(|(prefix, _)| key.starts_with(prefix.as_bytes())) else { return 0 };
    pipe.cmd("EXPIRE").arg(key.as_slice()).arg(*ttl).arg("NX").ignore();
    1
}
