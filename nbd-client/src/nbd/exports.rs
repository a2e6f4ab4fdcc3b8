//! The exports a server offers, by name, and what it advertises for each.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::nbd::proto;
use volume_engine::export::BlockExport;

/// How one export is offered to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Advertise `NBD_FLAG_READ_ONLY` and refuse writes, trims and zeroing with `EPERM`.
    pub read_only: bool,
    /// Text for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub description: Option<String>,
}

impl ExportOptions {
    pub fn read_write() -> Self {
        Self { read_only: false, description: None }
    }

    pub fn read_only() -> Self {
        Self { read_only: true, description: None }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self::read_write()
    }
}

/// One named export as the protocol sees it.
pub(crate) struct ExportEntry<E> {
    pub name: String,
    pub export: Arc<E>,
    pub options: ExportOptions,
}

impl<E: BlockExport> ExportEntry<E> {
    pub fn size(&self) -> u64 {
        self.export.size()
    }

    /// Every export supports the full command set; multi-conn is safe because
    /// FLUSH and FUA act on the export, not on a per-connection cache.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_TRIM
            | proto::FLAG_SEND_WRITE_ZEROES
            | proto::FLAG_CAN_MULTI_CONN;
        if self.options.read_only {
            flags |= proto::FLAG_READ_ONLY;
        }
        flags
    }
}

/// Size and flags of an export, as a client learns them in the handshake.
/// Kernel attach hands these to the kernel, which does no handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub transmission_flags: u16,
}

/// Name → export. The empty name (the protocol's "default export") resolves
/// to an export registered as "" if there is one, else to the first export
/// added that is still present.
pub(crate) struct ExportRegistry<E> {
    inner: RwLock<Registry<E>>,
}

struct Registry<E> {
    by_name: BTreeMap<String, Arc<ExportEntry<E>>>,
    order: Vec<String>,
}

impl<E: BlockExport> ExportRegistry<E> {
    pub fn new() -> Self {
        Self { inner: RwLock::new(Registry { by_name: BTreeMap::new(), order: Vec::new() }) }
    }

    /// Adds an export; returns false if the name is taken.
    pub fn insert(&self, name: String, export: Arc<E>, options: ExportOptions) -> bool {
        let mut reg = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if reg.by_name.contains_key(&name) {
            return false;
        }
        reg.order.push(name.clone());
        reg.by_name.insert(name.clone(), Arc::new(ExportEntry { name, export, options }));
        true
    }

    /// Removes an export; connections already using it keep it until they close.
    pub fn remove(&self, name: &str) -> bool {
        let mut reg = self.inner.write().unwrap_or_else(|e| e.into_inner());
        reg.order.retain(|n| n != name);
        reg.by_name.remove(name).is_some()
    }

    pub fn lookup(&self, name: &str) -> Option<Arc<ExportEntry<E>>> {
        let reg = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = reg.by_name.get(name) {
            return Some(entry.clone());
        }
        if name.is_empty() {
            return reg.order.first().and_then(|n| reg.by_name.get(n)).cloned();
        }
        None
    }

    pub fn list(&self) -> Vec<Arc<ExportEntry<E>>> {
        let reg = self.inner.read().unwrap_or_else(|e| e.into_inner());
        reg.order.iter().filter_map(|n| reg.by_name.get(n)).cloned().collect()
    }
}
