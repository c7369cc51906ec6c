//! The mesh's TCP side (port 6783): the listener, dialling, and one task per
//! connection that runs the sans-I/O [`Connection`] over its socket.
//!
//! A connection task only moves bytes: it feeds what it reads to the state machine,
//! writes what the state machine queues, and reports events (ready, messages, the
//! end) to the node, which decides everything else. It ends when the socket closes,
//! the protocol fails, the node asks it to, or the node goes away.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
};
use weft::mesh::{
    connection::{Connection, ConnectionConfig, Event, RemoteIntro},
    router::ConnKey,
    wire::Message,
};

/// How long dialling a peer may take (Weave's header deadline).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write may wait for the peer to read (a peer that stops reading is
/// dropped rather than holding the connection's task forever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer of a connection.
const READ_CHUNK: usize = 64 * 1024;

/// What a connection task reports to the node.
#[derive(Debug)]
pub enum ConnEvent {
    /// The handshake completed.
    Ready(Box<RemoteIntro>),
    /// A message arrived.
    Message(Message),
    /// The connection ended (`reason` in Weave's words where it has them); `ready`
    /// tells whether it got past the handshake.
    Closed {
        /// Why.
        reason: String,
        /// Whether [`ConnEvent::Ready`] was reported.
        ready: bool,
    },
}

/// What the node asks of a connection task.
#[derive(Debug)]
pub enum Outgoing {
    /// Send a message.
    Send(Message),
    /// Close the connection (the node already forgot it).
    Close,
}

/// The node's side of one connection task.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl ConnHandle {
    /// Queues a message (dropped if the task ended: its end is reported anyway).
    pub fn send(&self, msg: Message) {
        let _ = self.tx.send(Outgoing::Send(msg));
    }

    /// Asks the task to close the connection.
    pub fn close(&self) {
        let _ = self.tx.send(Outgoing::Close);
    }
}

/// Starts the task of a connected socket; events go to `events` tagged with `conn`.
pub fn spawn_connection<E>(
    conn: ConnKey,
    stream: TcpStream,
    config: ConnectionConfig,
    events: mpsc::UnboundedSender<E>,
    wrap: fn(ConnKey, ConnEvent) -> E,
) -> ConnHandle
where
    E: Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut ready = false;
        let reason = match drive(stream, config, rx, &events, wrap, conn, &mut ready).await {
            Ok(reason) => reason,
            Err(reason) => reason,
        };
        let _ = events.send(wrap(conn, ConnEvent::Closed { reason, ready }));
    });
    ConnHandle { tx }
}

/// Runs one connection until it ends; returns why.
async fn drive<E>(
    stream: TcpStream,
    config: ConnectionConfig,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    events: &mpsc::UnboundedSender<E>,
    wrap: fn(ConnKey, ConnEvent) -> E,
    conn: ConnKey,
    ready: &mut bool,
) -> Result<String, String> {
    // No Nagle delay for small control messages (as Go does for weaver's). Unlike
    // weaver, a connection is closed with a FIN, not a reset: the peer then still
    // reads what was sent before (its own error is clearer than "connection reset").
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    let mut machine = Connection::new(config, Instant::now());
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let out = machine.take_output();
        if !out.is_empty() {
            match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write: {e}")),
                Err(_) => return Err("write: i/o timeout".to_owned()),
            }
        }
        while let Some(event) = machine.poll_event() {
            let event = match event {
                Event::Ready(intro) => {
                    *ready = true;
                    ConnEvent::Ready(Box::new(intro))
                }
                Event::Message(msg) => ConnEvent::Message(msg),
            };
            if events.send(wrap(conn, event)).is_err() {
                return Ok("the agent is stopping".to_owned());
            }
        }
        let deadline = machine
            .next_timer()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = read.read(&mut buf) => match r {
                Ok(0) => return Err("EOF".to_owned()),
                Ok(n) => {
                    if let Err(e) = machine.receive(&buf[..n], Instant::now()) {
                        // What the state machine queued before the error (our features,
                        // say) still goes out, so the peer sees the real problem.
                        let out = machine.take_output();
                        let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await;
                        return Err(e.to_string());
                    }
                }
                Err(e) => return Err(format!("read: {e}")),
            },
            m = outgoing.recv() => match m {
                Some(Outgoing::Send(msg)) => machine.send(&msg).map_err(|e| e.to_string())?,
                Some(Outgoing::Close) | None => {
                    // Flush what is queued (a last gossip, an error) before closing.
                    let out = machine.take_output();
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await;
                    return Ok("closed".to_owned());
                }
            },
            () = tokio::time::sleep_until(deadline.into()) => {
                machine.poll_timers(Instant::now()).map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Dials `addr` from our underlay address (so the peer sees the address it knows
/// us by), with [`DIAL_TIMEOUT`].
pub async fn dial(addr: SocketAddr, local: Option<std::net::IpAddr>) -> Result<TcpStream, String> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| e.to_string())?;
    if let Some(ip) = local
        && ip.is_ipv4() == addr.is_ipv4()
    {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| e.to_string())?;
    }
    match tokio::time::timeout(DIAL_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
        Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
    }
}

/// Binds the mesh's listener on `port` (all addresses, as weaver does).
pub fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    socket.listen(1024)
}
