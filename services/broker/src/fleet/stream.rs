//! One agent's `StatusStream` on the wire: a task per stream that decodes the agent's reports
//! ([`super::wire`]), hands each to the core's session ([`AgentSession`]: stores the statuses,
//! keeps the presence marker, answers, configuration reloads), has the session send the commands
//! queued for the agent when it is woken ([`super::wake`]) or at the sweep interval, and encodes
//! the commands onto the stream.
//!
//! The stream ends
//! - cleanly when the agent closes its side or goes away;
//! - ABORTED when a newer stream of the same agent (on any replica) took over the presence marker;
//! - PERMISSION_DENIED when the agent record is revoked or deleted (checked on every report);
//! - UNAVAILABLE when the broker shuts down, or the store fails while a report is handled.

use std::time::Duration;

use tokenfleet_core::fleet::model::AgentCommand;
use tokenfleet_core::fleet::{AgentSession, CommandSink, FleetSettings};
use tokenfleet_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument as _;

use super::CommandStream;
use crate::edge::grpc_status::status;
use crate::identity::peer::AgentPeer;
use crate::state::BrokerState;

/// Commands buffered towards one agent.
const COMMAND_BUFFER: usize = 16;

/// Starts the stream's task; the returned stream carries the commands.
pub fn start(
    state: &BrokerState,
    settings: &FleetSettings,
    peer: AgentPeer,
    reports: Streaming<pb::AgentReport>,
) -> CommandStream {
    let (tx, rx) = mpsc::channel(COMMAND_BUFFER);
    let session = AgentSession::new(state, settings, &peer);
    let span = tracing::info_span!(
        "status_stream",
        agent = %peer.id,
        replica = %settings.replica,
    );
    let stream = Stream {
        session,
        state: state.clone(),
        settings: settings.clone(),
        tenant: peer.id.tenant.clone(),
        agent: peer.id.name.clone(),
    };
    tokio::spawn(stream.run(reports, tx).instrument(span));
    Box::pin(ReceiverStream::new(rx).map(|command| *command))
}

/// Commands go down the channel boxed: its buffer is allocated in blocks of 32 slots whatever
/// its bound, and a slot of the unboxed item would cost every idle stream kilobytes.
type Tx = mpsc::Sender<Box<Result<pb::AgentCommand, Status>>>;

/// The agent's side of the channel the commands go down.
struct Sink<'a>(&'a Tx);

#[async_trait::async_trait]
impl CommandSink for Sink<'_> {
    async fn send(&mut self, command: AgentCommand) -> bool {
        self.0
            .send(Box::new(Ok(super::wire::command_out(command))))
            .await
            .is_ok()
    }
}

struct Stream {
    session: AgentSession,
    state: BrokerState,
    settings: FleetSettings,
    tenant: String,
    agent: String,
}

impl Stream {
    async fn run(mut self, mut reports: Streaming<pb::AgentReport>, tx: Tx) {
        tracing::info!("status stream opened");
        let mut poll = tokio::time::interval(self.settings.command_sweep);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.settings.shutdown.clone();
        // Woken when a command is queued for the agent on this replica (see `super::wake`).
        let woken = tokenfleet_core::fleet::wake::register(&self.state, &self.tenant, &self.agent);
        let end: Result<&'static str, Status> = loop {
            tokio::select! {
                () = tx.closed() => break Ok("agent went away"),
                () = stopping(&mut shutdown) => {
                    break Err(Status::unavailable("the broker is shutting down; reconnect"));
                }
                message = reports.message() => match message {
                    Ok(Some(report)) => {
                        let report = super::wire::report_in(report);
                        // Boxed: the report's future is large and lives only while a report
                        // is handled; inline it would sit in every idle stream's task.
                        let mut sink = Sink(&tx);
                        let handled = Box::pin(self.session.on_report(report, &mut sink));
                        if let Err(error) = handled.await {
                            break Err(status(error));
                        }
                    }
                    Ok(None) => break Ok("agent closed the stream"),
                    Err(status) => {
                        // A report that does not decode is the agent's bad input, not a break.
                        if let Some(invalid) = crate::malformed::request_decode_failure(&status) {
                            break Err(invalid);
                        }
                        tracing::debug!(code = ?status.code(), message = status.message(), "status stream broken");
                        break Ok("stream broken");
                    }
                },
                () = woken.notified() => {
                    if self.session.joined()
                        && let Err(error) = Box::pin(self.session.poll(&mut Sink(&tx), true)).await
                    {
                        break Err(status(error));
                    }
                }
                _ = poll.tick() => {
                    if self.session.joined()
                        && let Err(error) = Box::pin(self.session.poll(&mut Sink(&tx), true)).await
                    {
                        break Err(status(error));
                    }
                }
            }
        };
        Box::pin(self.session.leave()).await;
        match end {
            Ok(why) => tracing::info!(why, "status stream closed"),
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "status stream ended");
                // The agent may not be reading; do not hang on it.
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), tx.send(Box::new(Err(status))))
                        .await;
            }
        }
    }
}

/// Completes when the broker is shutting down (never without a shutdown signal).
async fn stopping(shutdown: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match shutdown {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                // The sender is gone: the server is going away too.
            }
        }
        None => std::future::pending().await,
    }
}
