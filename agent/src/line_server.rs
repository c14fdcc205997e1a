//! What the two line-oriented servers of the agent — the SMTP [`crate::ingress`] and the local
//! POP3 server ([`crate::pop3_server`]) — share: the accept loop with shutdown draining and
//! bounded line reading. Each protocol keeps its own replies.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One line read from the client.
pub enum Line {
    /// A line, without its CRLF (or bare LF).
    Text(Vec<u8>),
    /// A line longer than the limit; all of it has been consumed and discarded.
    TooLong,
    /// The client went away, timed out (already answered) or the server is stopping.
    Closed,
}

/// Reads one line of at most `limit` bytes (line end included). Over-long lines are consumed to
/// their end and reported as [`Line::TooLong`]; a partial line at EOF is dropped.
pub async fn read_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Closed);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long && line.len() + n <= limit {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line = Vec::new();
        }
        reader.consume(n);
        if done {
            if too_long {
                return Ok(Line::TooLong);
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Text(line));
        }
    }
}

/// Writes `bytes` and flushes.
pub async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Accepts connections on `listener` until `shutdown` completes, running `session` for each on
/// its own task (with `TCP_NODELAY` set and a receiver that turns `true` when the server stops).
/// Then stops accepting, signals the sessions and waits for them to end. `what` names the
/// protocol in log lines; accept errors (out of file descriptors and the like) are logged and
/// followed by a short back-off.
pub async fn serve<F, S>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    what: &'static str,
    mut session: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream, SocketAddr, watch::Receiver<bool>) -> S,
    S: Future<Output = io::Result<()>> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let run = session(stream, peer, stop_rx.clone());
                        sessions.spawn(async move {
                            if let Err(e) = run.await {
                                tracing::debug!(%peer, error = %e, "{what} session ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{what} accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    while sessions.join_next().await.is_some() {}
    Ok(())
}
