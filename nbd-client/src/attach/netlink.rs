//! The kernel's generic-netlink `nbd` family (`include/uapi/linux/nbd-netlink.h`):
//! connect a device to sockets we serve, hand a live device new sockets,
//! disconnect it, and list devices.
//!
//! Messages are built by pure functions (unit-tested byte for byte) and sent
//! with `neli`; the family id is resolved at run time.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use neli::consts::genl::{Cmd, NlAttrType};
use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::err::RouterError;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::neli_enum;
use neli::nl::NlPayload;
use neli::router::synchronous::NlRouter;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;

use crate::attach::request_timeout::{connect_timeout_seconds, whole_seconds};

pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;

/// `NBD_ATTR_CLIENT_FLAGS`: remove the device when it is disconnected.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
/// `NBD_ATTR_CLIENT_FLAGS`: disconnect when the last opener closes the device.
pub const NBD_CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

#[neli_enum(serialized_type = "u8")]
pub enum NbdCmd {
    Unspec = 0,
    Connect = 1,
    Disconnect = 2,
    Reconfigure = 3,
    LinkDead = 4,
    Status = 5,
}
impl Cmd for NbdCmd {}

#[neli_enum(serialized_type = "u16")]
pub enum NbdAttr {
    Unspec = 0,
    Index = 1,
    SizeBytes = 2,
    BlockSizeBytes = 3,
    Timeout = 4,
    ServerFlags = 5,
    ClientFlags = 6,
    Sockets = 7,
    DeadConnTimeout = 8,
    DeviceList = 9,
    BackendIdentifier = 10,
}
impl NlAttrType for NbdAttr {}

/// Entries of `NBD_ATTR_SOCKETS`.
#[neli_enum(serialized_type = "u16")]
pub enum NbdSockItem {
    Unspec = 0,
    Item = 1,
}
impl NlAttrType for NbdSockItem {}

#[neli_enum(serialized_type = "u16")]
pub enum NbdSock {
    Unspec = 0,
    Fd = 1,
}
impl NlAttrType for NbdSock {}

/// Entries of `NBD_ATTR_DEVICE_LIST`.
#[neli_enum(serialized_type = "u16")]
pub enum NbdDeviceItem {
    Unspec = 0,
    Item = 1,
}
impl NlAttrType for NbdDeviceItem {}

#[neli_enum(serialized_type = "u16")]
pub enum NbdDevice {
    Unspec = 0,
    Index = 1,
    Connected = 2,
}
impl NlAttrType for NbdDevice {}

pub type NbdMessage = Genlmsghdr<NbdCmd, NbdAttr>;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("kernel has no nbd module: generic netlink family \"nbd\" does not exist (try `modprobe nbd`)")]
    NoNbdModule,
    #[error("netlink socket: {0}")]
    Socket(String),
    #[error("kernel refused NBD_CMD_{command}: {source}")]
    Kernel { command: &'static str, source: io::Error },
    #[error("cannot encode netlink message: {0}")]
    Encode(String),
    #[error("malformed netlink reply: {0}")]
    Decode(String),
}

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Device index; `None` lets the kernel pick (or create) a free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    pub block_size: u64,
    /// NBD transmission flags of the export (what a handshake would report).
    pub server_flags: u64,
    pub client_flags: u64,
    /// Per-request timeout; `None` sets the kernel's default (30 s). Always
    /// sent: the block layer keeps a device's timer from one connection to
    /// the next, so an earlier user's short timeout would otherwise apply.
    pub timeout: Option<Duration>,
    /// How long requests wait for a reconnect after every socket died.
    pub dead_conn_timeout: Option<Duration>,
    /// Stored by the kernel as `/sys/block/nbdN/backend` (kernel ≥ 5.13).
    pub backend: Option<String>,
}

/// What `NBD_CMD_RECONFIGURE` changes; sockets replace dead connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconfigureParams {
    /// New device size (a grown volume).
    pub size_bytes: Option<u64>,
    pub block_size: Option<u64>,
    pub timeout: Option<Duration>,
    pub dead_conn_timeout: Option<Duration>,
    pub client_flags: Option<u64>,
    /// Must repeat the identifier the device was connected with: the kernel
    /// refuses to reconfigure a device with a backend without it, and
    /// refuses a different one.
    pub backend: Option<String>,
}

/// One entry of `NBD_CMD_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

fn encode_err(e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError::Encode(e.to_string())
}

fn attr<P>(kind: NbdAttr, payload: P) -> Result<Nlattr<NbdAttr, Buffer>, NetlinkError>
where
    P: neli::Size + neli::ToBytes,
{
    NlattrBuilder::default()
        .nla_type(AttrTypeBuilder::default().nla_type(kind).build().map_err(encode_err)?)
        .nla_payload(payload)
        .build()
        .map_err(encode_err)
}

/// `NBD_ATTR_SOCKETS { SOCK_ITEM { SOCK_FD }, ... }`.
fn sockets_attr(fds: &[BorrowedFd<'_>]) -> Result<Nlattr<NbdAttr, Buffer>, NetlinkError> {
    let mut sockets = attr(NbdAttr::Sockets, Buffer::new())?;
    for fd in fds {
        let fd_attr = NlattrBuilder::default()
            .nla_type(AttrTypeBuilder::default().nla_type(NbdSock::Fd).build().map_err(encode_err)?)
            .nla_payload(fd.as_raw_fd() as u32)
            .build()
            .map_err(encode_err)?;
        let item = NlattrBuilder::default()
            .nla_type(AttrTypeBuilder::default().nla_type(NbdSockItem::Item).build().map_err(encode_err)?)
            .nla_payload(Buffer::new())
            .build()
            .map_err(encode_err)?
            .nest(&fd_attr)
            .map_err(encode_err)?;
        sockets = sockets.nest(&item).map_err(encode_err)?;
    }
    Ok(sockets)
}

fn message(cmd: NbdCmd, attrs: Vec<Nlattr<NbdAttr, Buffer>>) -> Result<NbdMessage, NetlinkError> {
    GenlmsghdrBuilder::default()
        .cmd(cmd)
        .version(NBD_GENL_VERSION)
        .attrs(attrs.into_iter().collect::<GenlBuffer<_, _>>())
        .build()
        .map_err(encode_err)
}

pub fn connect_message(params: &ConnectParams, sockets: &[BorrowedFd<'_>]) -> Result<NbdMessage, NetlinkError> {
    let mut attrs = Vec::new();
    if let Some(index) = params.index {
        attrs.push(attr(NbdAttr::Index, index)?);
    }
    attrs.push(attr(NbdAttr::SizeBytes, params.size_bytes)?);
    attrs.push(attr(NbdAttr::BlockSizeBytes, params.block_size)?);
    attrs.push(attr(NbdAttr::ServerFlags, params.server_flags)?);
    attrs.push(attr(NbdAttr::ClientFlags, params.client_flags)?);
    attrs.push(attr(NbdAttr::Timeout, connect_timeout_seconds(params.timeout))?);
    if let Some(timeout) = params.dead_conn_timeout {
        attrs.push(attr(NbdAttr::DeadConnTimeout, timeout.as_secs())?);
    }
    if let Some(backend) = &params.backend {
        attrs.push(attr(NbdAttr::BackendIdentifier, backend.as_str())?);
    }
    attrs.push(sockets_attr(sockets)?);
    message(NbdCmd::Connect, attrs)
}

pub fn reconfigure_message(
    index: u32,
    params: &ReconfigureParams,
    sockets: &[BorrowedFd<'_>],
) -> Result<NbdMessage, NetlinkError> {
    let mut attrs = vec![attr(NbdAttr::Index, index)?];
    if let Some(size) = params.size_bytes {
        attrs.push(attr(NbdAttr::SizeBytes, size)?);
    }
    if let Some(block_size) = params.block_size {
        attrs.push(attr(NbdAttr::BlockSizeBytes, block_size)?);
    }
    if let Some(timeout) = params.timeout {
        attrs.push(attr(NbdAttr::Timeout, whole_seconds(timeout))?);
    }
    if let Some(timeout) = params.dead_conn_timeout {
        attrs.push(attr(NbdAttr::DeadConnTimeout, timeout.as_secs())?);
    }
    if let Some(flags) = params.client_flags {
        attrs.push(attr(NbdAttr::ClientFlags, flags)?);
    }
    if let Some(backend) = &params.backend {
        attrs.push(attr(NbdAttr::BackendIdentifier, backend.as_str())?);
    }
    if !sockets.is_empty() {
        attrs.push(sockets_attr(sockets)?);
    }
    message(NbdCmd::Reconfigure, attrs)
}

pub fn disconnect_message(index: u32) -> Result<NbdMessage, NetlinkError> {
    message(NbdCmd::Disconnect, vec![attr(NbdAttr::Index, index)?])
}

pub fn status_message(index: Option<u32>) -> Result<NbdMessage, NetlinkError> {
    let attrs = match index {
        Some(index) => vec![attr(NbdAttr::Index, index)?],
        None => Vec::new(),
    };
    message(NbdCmd::Status, attrs)
}

/// Reads `NBD_ATTR_DEVICE_LIST` from a status reply.
pub fn parse_status(reply: &NbdMessage) -> Result<Vec<DeviceStatus>, NetlinkError> {
    let decode = |e: neli::err::DeError| NetlinkError::Decode(e.to_string());
    let attrs = reply.attrs().get_attr_handle();
    let Ok(list) = attrs.get_nested_attributes::<NbdDeviceItem>(NbdAttr::DeviceList) else {
        return Ok(Vec::new());
    };
    let mut devices = Vec::new();
    for item in list.get_attrs() {
        if *item.nla_type().nla_type() != NbdDeviceItem::Item {
            continue;
        }
        let fields = item.get_attr_handle::<NbdDevice>().map_err(decode)?;
        let index = fields.get_attr_payload_as::<u32>(NbdDevice::Index).map_err(decode)?;
        let connected = fields.get_attr_payload_as::<u8>(NbdDevice::Connected).map_err(decode)? != 0;
        devices.push(DeviceStatus { index, connected });
    }
    Ok(devices)
}

/// A netlink socket bound to the resolved `nbd` family.
pub struct NbdNetlink {
    router: NlRouter,
    family: u16,
}

impl NbdNetlink {
    /// Opens a generic netlink socket and resolves the `nbd` family;
    /// [`NetlinkError::NoNbdModule`] when the kernel has none.
    pub fn open() -> Result<Self, NetlinkError> {
        let (router, _multicast) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
            .map_err(|e| NetlinkError::Socket(e.to_string()))?;
        let family = match router.resolve_genl_family(NBD_GENL_FAMILY_NAME) {
            Ok(family) => family,
            Err(RouterError::Nlmsgerr(e)) if -*e.error() == libc::ENOENT => return Err(NetlinkError::NoNbdModule),
            // Older neli paths report a missing family as a plain message.
            Err(RouterError::Msg(m)) if m.to_string().contains("not found") => return Err(NetlinkError::NoNbdModule),
            Err(e) => return Err(NetlinkError::Socket(format!("resolving the nbd family: {e}"))),
        };
        Ok(Self { router, family })
    }

    pub fn family_id(&self) -> u16 {
        self.family
    }

    /// Configures a device on `sockets` (kernel ends of connections we
    /// serve) and returns its index. The kernel keeps its own references to
    /// the sockets; the caller may close its descriptors afterwards.
    pub fn connect(&self, params: &ConnectParams, sockets: &[BorrowedFd<'_>]) -> Result<u32, NetlinkError> {
        let replies = self.request("CONNECT", connect_message(params, sockets)?)?;
        for reply in &replies {
            if let Ok(index) = reply.attrs().get_attr_handle().get_attr_payload_as::<u32>(NbdAttr::Index) {
                return Ok(index);
            }
        }
        // Kernels always answer with the index; fall back to what we asked for.
        params.index.ok_or_else(|| NetlinkError::Decode("CONNECT reply without NBD_ATTR_INDEX".into()))
    }

    /// Hands a live device new sockets: each replaces a dead connection, and
    /// requests waiting on the dead-connection timeout are resent on it.
    pub fn reconfigure(
        &self,
        index: u32,
        params: &ReconfigureParams,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<(), NetlinkError> {
        self.request("RECONFIGURE", reconfigure_message(index, params, sockets)?).map(|_| ())
    }

    /// Disconnects a device: the kernel sends `NBD_CMD_DISC` on every
    /// connection and fails nothing that already completed.
    pub fn disconnect(&self, index: u32) -> Result<(), NetlinkError> {
        self.request("DISCONNECT", disconnect_message(index)?).map(|_| ())
    }

    /// Lists devices (or one device) and whether each is configured.
    pub fn status(&self, index: Option<u32>) -> Result<Vec<DeviceStatus>, NetlinkError> {
        let replies = self.request("STATUS", status_message(index)?)?;
        let mut devices = Vec::new();
        for reply in &replies {
            devices.extend(parse_status(reply)?);
        }
        Ok(devices)
    }

    /// Sends one request with an ACK requested and collects the replies.
    fn request(&self, command: &'static str, msg: NbdMessage) -> Result<Vec<NbdMessage>, NetlinkError> {
        let receiver = self
            .router
            .send::<u16, NbdMessage, u16, NbdMessage>(self.family, NlmF::ACK, NlPayload::Payload(msg))
            .map_err(|e| NetlinkError::Socket(format!("sending NBD_CMD_{command}: {e}")))?;
        let mut replies = Vec::new();
        for reply in receiver {
            match reply {
                Ok(msg) => {
                    if let NlPayload::Payload(payload) = msg.nl_payload() {
                        replies.push(payload.clone());
                    }
                }
                Err(RouterError::Nlmsgerr(e)) => {
                    return Err(NetlinkError::Kernel { command, source: io::Error::from_raw_os_error(-*e.error()) });
                }
                Err(e) => return Err(NetlinkError::Socket(format!("NBD_CMD_{command}: {e}"))),
            }
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::os::fd::BorrowedFd;

    use neli::{FromBytesWithInput, Size, ToBytes};

    use super::*;

    fn bytes(msg: &NbdMessage) -> Vec<u8> {
        let mut cursor = Cursor::new(Vec::new());
        msg.to_bytes(&mut cursor).unwrap();
        let out = cursor.into_inner();
        assert_eq!(out.len(), msg.padded_size());
        out
    }

    /// Descriptors only appear as numbers in the message; nothing is opened.
    fn fds(raw: &[i32]) -> Vec<BorrowedFd<'static>> {
        raw.iter().map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) }).collect()
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn connect_message_bytes() {
        let params = ConnectParams {
            index: Some(3),
            size_bytes: 1 << 30,
            block_size: 4096,
            server_flags: 0x16d,
            client_flags: 0,
            timeout: None,
            dead_conn_timeout: Some(Duration::from_secs(120)),
            backend: Some("vol-1".into()),
        };
        let msg = connect_message(&params, &fds(&[5, 6])).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            1, 1, 0, 0,                                     // genl: cmd CONNECT, version 1
            8, 0, 1, 0, 3, 0, 0, 0,                         // INDEX u32 3
            12, 0, 2, 0, 0, 0, 0, 0x40, 0, 0, 0, 0,         // SIZE_BYTES u64 1 GiB
            12, 0, 3, 0, 0, 0x10, 0, 0, 0, 0, 0, 0,         // BLOCK_SIZE_BYTES u64 4096
            12, 0, 5, 0, 0x6d, 0x01, 0, 0, 0, 0, 0, 0,      // SERVER_FLAGS u64
            12, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0,            // CLIENT_FLAGS u64 0
            12, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0,            // TIMEOUT u64 0: the kernel's default
            12, 0, 8, 0, 120, 0, 0, 0, 0, 0, 0, 0,          // DEAD_CONN_TIMEOUT u64 120
            10, 0, 10, 0, b'v', b'o', b'l', b'-', b'1', 0, 0, 0, // BACKEND_IDENTIFIER "vol-1\0" + pad
            28, 0, 7, 0x80,                                 // SOCKETS, nested
            12, 0, 1, 0x80,                                 //   SOCK_ITEM, nested
            8, 0, 1, 0, 5, 0, 0, 0,                         //     SOCK_FD 5
            12, 0, 1, 0x80,                                 //   SOCK_ITEM, nested
            8, 0, 1, 0, 6, 0, 0, 0,                         //     SOCK_FD 6
        ];
        assert_eq!(bytes(&msg), want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn connect_without_index_or_optionals() {
        let params = ConnectParams {
            index: None,
            size_bytes: 512,
            block_size: 512,
            server_flags: 1,
            client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
            timeout: Some(Duration::from_secs(30)),
            dead_conn_timeout: None,
            backend: None,
        };
        let msg = connect_message(&params, &fds(&[9])).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            1, 1, 0, 0,
            12, 0, 2, 0, 0, 2, 0, 0, 0, 0, 0, 0,            // SIZE_BYTES 512
            12, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0,            // BLOCK_SIZE_BYTES 512
            12, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0,            // SERVER_FLAGS 1
            12, 0, 6, 0, 1, 0, 0, 0, 0, 0, 0, 0,            // CLIENT_FLAGS DESTROY_ON_DISCONNECT
            12, 0, 4, 0, 30, 0, 0, 0, 0, 0, 0, 0,           // TIMEOUT 30
            16, 0, 7, 0x80,
            12, 0, 1, 0x80,
            8, 0, 1, 0, 9, 0, 0, 0,
        ];
        assert_eq!(bytes(&msg), want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn reconfigure_disconnect_and_status_bytes() {
        let params = ReconfigureParams {
            dead_conn_timeout: Some(Duration::from_secs(60)),
            backend: Some("v".into()),
            ..Default::default()
        };
        let msg = reconfigure_message(2, &params, &fds(&[7])).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            3, 1, 0, 0,                                     // RECONFIGURE
            8, 0, 1, 0, 2, 0, 0, 0,                         // INDEX 2
            12, 0, 8, 0, 60, 0, 0, 0, 0, 0, 0, 0,           // DEAD_CONN_TIMEOUT 60
            6, 0, 10, 0, b'v', 0, 0, 0,                     // BACKEND_IDENTIFIER "v\0" + pad
            16, 0, 7, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 7, 0, 0, 0,
        ];
        assert_eq!(bytes(&msg), want);

        let resize = ReconfigureParams { size_bytes: Some(1 << 21), block_size: Some(512), ..Default::default() };
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            3, 1, 0, 0,
            8, 0, 1, 0, 0, 0, 0, 0,                         // INDEX 0
            12, 0, 2, 0, 0, 0, 0x20, 0, 0, 0, 0, 0,         // SIZE_BYTES 2 MiB
            12, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0,            // BLOCK_SIZE_BYTES 512
        ];
        assert_eq!(bytes(&reconfigure_message(0, &resize, &[]).unwrap()), want);

        assert_eq!(bytes(&disconnect_message(4).unwrap()), [2, 1, 0, 0, 8, 0, 1, 0, 4, 0, 0, 0]);
        assert_eq!(bytes(&status_message(None).unwrap()), [5, 1, 0, 0]);
        assert_eq!(bytes(&status_message(Some(1)).unwrap()), [5, 1, 0, 0, 8, 0, 1, 0, 1, 0, 0, 0]);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn status_reply_parsing() {
        // A reply as the kernel builds it: DEVICE_LIST { ITEM { INDEX u32, CONNECTED u8 }, ... }.
        #[rustfmt::skip]
        let reply: Vec<u8> = vec![
            5, 1, 0, 0,
            44, 0, 9, 0,                                    // DEVICE_LIST (kernel nests without NLA_F_NESTED)
            20, 0, 1, 0, 8, 0, 1, 0, 0, 0, 0, 0, 5, 0, 2, 0, 1, 0, 0, 0, // nbd0 connected
            20, 0, 1, 0, 8, 0, 1, 0, 1, 0, 0, 0, 5, 0, 2, 0, 0, 0, 0, 0, // nbd1 free
        ];
        let len = reply.len();
        let msg = NbdMessage::from_bytes_with_input(&mut Cursor::new(reply), len).unwrap();
        assert_eq!(
            parse_status(&msg).unwrap(),
            [DeviceStatus { index: 0, connected: true }, DeviceStatus { index: 1, connected: false }]
        );
        let empty = NbdMessage::from_bytes_with_input(&mut Cursor::new(vec![5, 1, 0, 0]), 4).unwrap();
        assert!(parse_status(&empty).unwrap().is_empty());
    }

    #[test]
    fn open_reports_a_missing_module_clearly() {
        // These machines have no nbd module; where one exists, opening works.
        match NbdNetlink::open() {
            Ok(nl) => assert_ne!(nl.family_id(), 0),
            Err(NetlinkError::NoNbdModule) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
