//! Handing a live kernel nbd device from one serving process to the next
//! (`nbd-client map --take-over`), with no pause the filesystem notices.
//!
//! The serving process listens on a unix socket in the state directory
//! (mode 0600). A successor connects and the two talk in JSON lines:
//!
//! 1. successor: `hello` (the volume it wants);
//! 2. predecessor: `offer` (the device index, the fencing epoch it writes
//!    at, whether it published the attachment itself);
//! 3. successor, once its volume is open at that epoch: `ready`;
//! 4. predecessor stops reading requests, answers those in flight, and
//!    sends `connections` with its ends of the kernel's sockets attached
//!    (`SCM_RIGHTS`), followed by the bytes it had read from each but not
//!    parsed;
//! 5. successor: `received`, once the state directory names it as the
//!    device's server and before it reads a byte from them; the
//!    predecessor exits.
//!
//! Until `received`, the predecessor keeps its own copies of the sockets
//! and goes on serving them if the successor goes away: nobody else has
//! read from them. The kernel takes part in none of this: no request waits
//! for a timeout.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::attach::HandedConnection;

/// How long either side waits for the other at each step. The successor
/// opens its volume between `offer` and `ready`.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections one device hands over (the kernel's queues per device
/// are far fewer in practice).
const MAX_CONNECTIONS: usize = 64;

/// What the predecessor serves the device with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// N of `/dev/nbdN`.
    pub index: u32,
    /// The fencing epoch its writes carry; the successor must write at the same.
    pub epoch: u64,
    /// Whether the predecessor published the volume to this node itself
    /// (and so unpublishes it on unmap): the successor inherits that.
    pub published: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
enum Message {
    Hello {
        volume_id: String,
    },
    Offer(Offer),
    Ready,
    /// The descriptors ride with this line; `unread[i]` bytes of connection
    /// i follow it, in order.
    Connections {
        unread: Vec<usize>,
    },
    Received,
    Refused {
        reason: String,
    },
}

/// The predecessor's side of one hand-over.
pub struct Predecessor(Channel);

impl Predecessor {
    /// Answers a successor's `hello` for `volume_id` with `offer` and waits
    /// until it is ready to serve. Blocking.
    pub fn greet(socket: UnixStream, volume_id: &str, offer: Offer) -> io::Result<Self> {
        let mut channel = Channel::new(socket)?;
        match channel.recv()? {
            Message::Hello { volume_id: wanted } if wanted == volume_id => {}
            Message::Hello { volume_id: wanted } => {
                let reason = format!("this process serves {volume_id}, not {wanted}");
                channel.send(&Message::Refused { reason: reason.clone() }, &[])?;
                return Err(io::Error::new(io::ErrorKind::InvalidInput, reason));
            }
            other => return Err(unexpected("hello", &other)),
        }
        channel.send(&Message::Offer(offer), &[])?;
        match channel.recv()? {
            Message::Ready => Ok(Self(channel)),
            other => Err(unexpected("ready", &other)),
        }
    }

    /// Sends the connections and waits until the successor has them. An
    /// error means it never took them: the caller still owns them and may
    /// serve them again. Blocking.
    pub fn deliver(mut self, connections: &[HandedConnection]) -> io::Result<()> {
        let fds: Vec<BorrowedFd<'_>> = connections.iter().map(|c| c.socket.as_fd()).collect();
        let unread = connections.iter().map(|c| c.unread.len()).collect();
        self.0.send(&Message::Connections { unread }, &fds)?;
        for connection in connections {
            self.0.socket.write_all(&connection.unread)?;
        }
        match self.0.recv()? {
            Message::Received => Ok(()),
            other => Err(unexpected("received", &other)),
        }
    }
}

/// The successor's side of one hand-over.
pub struct Successor(Channel);

impl Successor {
    /// Asks the process listening at `path` for `volume_id`'s device.
    /// Blocking.
    pub fn connect(path: &Path, volume_id: &str) -> io::Result<(Self, Offer)> {
        let socket = UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display())))?;
        Self::connect_stream(socket, volume_id)
    }

    fn connect_stream(socket: UnixStream, volume_id: &str) -> io::Result<(Self, Offer)> {
        let mut channel = Channel::new(socket)?;
        channel.send(&Message::Hello { volume_id: volume_id.to_owned() }, &[])?;
        match channel.recv()? {
            Message::Offer(offer) => Ok((Self(channel), offer)),
            other => Err(unexpected("offer", &other)),
        }
    }

    /// Says it is ready and receives the connections. They are this
    /// process's once it [confirms](Receipt::confirm) receipt, which it does
    /// after recording itself as the device's server (the predecessor's
    /// standby reads that record when the predecessor exits) and before it
    /// reads from them. Blocking.
    pub fn take(mut self) -> io::Result<(Vec<HandedConnection>, Receipt)> {
        self.0.send(&Message::Ready, &[])?;
        let unread = match self.0.recv()? {
            Message::Connections { unread } => unread,
            other => return Err(unexpected("connections", &other)),
        };
        let sockets = std::mem::take(&mut self.0.fds);
        if sockets.len() != unread.len() {
            let why = format!("{} descriptors arrived for {} connections", sockets.len(), unread.len());
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        let mut connections = Vec::with_capacity(sockets.len());
        for (socket, len) in sockets.into_iter().zip(unread) {
            connections.push(HandedConnection { socket, unread: self.0.recv_bytes(len)?.into() });
        }
        Ok((connections, Receipt(self.0)))
    }
}

/// The successor's last word: it has the connections; the predecessor may go.
pub struct Receipt(Channel);

impl Receipt {
    /// Blocking.
    pub fn confirm(mut self) -> io::Result<()> {
        self.0.send(&Message::Received, &[])
    }
}

fn unexpected(wanted: &str, got: &Message) -> io::Error {
    let why = match got {
        Message::Refused { reason } => format!("refused: {reason}"),
        other => format!("expected {wanted}, got {other:?}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// JSON lines over a unix stream, with descriptors passed alongside. Every
/// read goes through `recvmsg`, so no descriptor is ever dropped by a plain
/// read of the bytes it rode with.
struct Channel {
    socket: UnixStream,
    received: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Channel {
    fn new(socket: UnixStream) -> io::Result<Self> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(STEP_TIMEOUT))?;
        socket.set_write_timeout(Some(STEP_TIMEOUT))?;
        Ok(Self { socket, received: Vec::new(), fds: Vec::new() })
    }

    fn send(&mut self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut sent = 0;
        if !fds.is_empty() {
            let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            let rights = [ControlMessage::ScmRights(&raw)];
            sent = sendmsg::<()>(self.socket.as_raw_fd(), &[IoSlice::new(&line)], &rights, MsgFlags::empty(), None)
                .map_err(io::Error::from)?;
        }
        self.socket.write_all(&line[sent..])
    }

    fn recv(&mut self) -> io::Result<Message> {
        loop {
            if let Some(end) = self.received.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.received.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad hand-over message: {e}")));
            }
            self.fill()?;
        }
    }

    fn recv_bytes(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.received.len() < len {
            self.fill()?;
        }
        Ok(self.received.drain(..len).collect())
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut space = nix::cmsg_space!([RawFd; MAX_CONNECTIONS]);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let (len, fds) = {
            let message =
                recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for cmsg in message.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    // SAFETY: the kernel just installed these descriptors in
                    // this process for us; nothing else owns them.
                    fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            (message.bytes, fds)
        };
        self.fds.extend(fds);
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other process hung up"));
        }
        self.received.extend_from_slice(&buffer[..len]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn read_all(mut socket: UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        socket.read_to_end(&mut out).unwrap();
        out
    }

    fn offer() -> Offer {
        Offer { index: 3, epoch: 7, published: true }
    }

    #[test]
    fn connections_and_their_unread_bytes_reach_the_successor() {
        let (a, b) = UnixStream::pair().unwrap();
        let (kernel1, ours1) = UnixStream::pair().unwrap();
        let (kernel2, ours2) = UnixStream::pair().unwrap();
        let predecessor = std::thread::spawn(move || {
            let predecessor = Predecessor::greet(a, "vol-a", offer()).unwrap();
            let connections = vec![
                HandedConnection { socket: ours1.into(), unread: bytes::Bytes::from_static(b"half a request") },
                HandedConnection { socket: ours2.into(), unread: bytes::Bytes::new() },
            ];
            predecessor.deliver(&connections).unwrap();
            // The predecessor's copies close here; the successor's stay open.
        });
        let (successor, got) = Successor::connect_stream(b, "vol-a").unwrap();
        assert_eq!(got, offer());
        let (connections, receipt) = successor.take().unwrap();
        receipt.confirm().unwrap();
        predecessor.join().unwrap();
        assert_eq!(connections.len(), 2);
        assert_eq!(&connections[0].unread[..], b"half a request");
        assert!(connections[1].unread.is_empty());

        // The descriptors are the same sockets: what one end writes, the
        // other end that came through the hand-over reads.
        let mut kernel1 = kernel1;
        kernel1.write_all(b"next").unwrap();
        kernel1.shutdown(std::net::Shutdown::Write).unwrap();
        let mut first = UnixStream::from(connections.into_iter().next().unwrap().socket);
        first.write_all(b"reply").unwrap();
        assert_eq!(read_all(first), b"next");
        assert_eq!(read_all(kernel1), b"reply");
        drop(kernel2);
    }

    #[test]
    fn a_hello_for_another_volume_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let predecessor = std::thread::spawn(move || Predecessor::greet(a, "vol-a", offer()).err().unwrap());
        let err = Successor::connect_stream(b, "vol-b").err().unwrap();
        assert!(err.to_string().contains("serves vol-a, not vol-b"), "{err}");
        assert!(predecessor.join().unwrap().to_string().contains("not vol-b"));
    }

    #[test]
    fn a_successor_that_goes_away_before_receiving_leaves_the_connections() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_kernel, ours) = UnixStream::pair().unwrap();
        let predecessor = std::thread::spawn(move || {
            let predecessor = Predecessor::greet(a, "vol-a", offer()).unwrap();
            let connections = vec![HandedConnection { socket: ours.into(), unread: bytes::Bytes::new() }];
            predecessor.deliver(&connections).map(|()| connections.len())
        });
        let (mut successor, _) = Successor::connect_stream(b, "vol-a").unwrap();
        successor.0.send(&Message::Ready, &[]).unwrap();
        drop(successor);
        let err = predecessor.join().unwrap().unwrap_err();
        // Which error depends on the race: whether the successor closed
        // before the connections were sent (broken pipe), after with them
        // unread (reset), or after reading them (end of file).
        let gone = [io::ErrorKind::UnexpectedEof, io::ErrorKind::BrokenPipe, io::ErrorKind::ConnectionReset];
        assert!(gone.contains(&err.kind()), "{err}");
    }
}
