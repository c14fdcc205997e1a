//! The status stream to the broker: one `StatusStream` per agent, reconnected with exponential
//! backoff (1 s → 60 s, jittered). A report goes up at once, then every heartbeat, at once when a
//! device's health changes, and with the answer to every command coming down.

use std::sync::Arc;
use std::time::Duration;

use tokenfleet_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::AgentRuntime;
use super::broker::status_text;
use crate::spool;

/// Default heartbeat when neither the broker nor the local file sets one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

/// Delay before reconnect number `attempt` (0 = first).
pub fn reconnect_delay(attempt: u32) -> Duration {
    spool::backoff(
        attempt,
        Duration::from_secs(1),
        Duration::from_secs(60),
        spool::random_jitter(),
    )
    .max(Duration::from_millis(500))
}

/// Streams status reports until `stop` turns true.
pub async fn report_status(rt: Arc<AgentRuntime>, mut stop: watch::Receiver<bool>) {
    let mut failures: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let (tx, rx) = mpsc::channel::<pb::AgentReport>(16);
        let first = rt.report(None).await;
        let _ = tx.send(first).await;
        let mut client = rt.link.client();
        let opened = tokio::select! {
            _ = stop.changed() => return,
            opened = client.status_stream(ReceiverStream::new(rx)) => opened,
        };
        let mut commands = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let wait = reconnect_delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %status_text(&status), retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "opening the status stream failed");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
        };
        tracing::info!("status stream open");
        failures = 0;
        let mut next_heartbeat = tokio::time::Instant::now() + rt.heartbeat();
        // Commands run beside the loop (a connection test may take up to two minutes):
        // heartbeats keep going, and each answer goes up when it is ready.
        let mut running = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep_until(next_heartbeat) => {
                    next_heartbeat = tokio::time::Instant::now() + rt.heartbeat();
                    if tx.send(rt.report(None).await).await.is_err() {
                        break;
                    }
                }
                () = rt.book.health_changed() => {
                    if rt.health_changed() {
                        next_heartbeat = tokio::time::Instant::now() + rt.heartbeat();
                        if tx.send(rt.report(None).await).await.is_err() {
                            break;
                        }
                    }
                }
                message = commands.message() => match message {
                    Ok(Some(command)) => {
                        let rt = Arc::clone(&rt);
                        running.spawn(async move { rt.handle_command(command).await });
                    }
                    Ok(None) => {
                        tracing::warn!("the broker closed the status stream; reconnecting");
                        break;
                    }
                    Err(status) => {
                        tracing::warn!(error = %status_text(&status), "the status stream failed; reconnecting");
                        break;
                    }
                },
                Some(done) = running.join_next(), if !running.is_empty() => {
                    match done {
                        Ok(result) => {
                            if tx.send(rt.report(Some(result)).await).await.is_err() {
                                break;
                            }
                        }
                        Err(error) => tracing::error!(%error, "a command task failed"),
                    }
                }
            }
        }
        // Answers of a stream that is gone have nobody to go to (the broker drops them).
        running.abort_all();
        let wait = reconnect_delay(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
