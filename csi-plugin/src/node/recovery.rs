//! After the node plugin restarts: volumes staged here whose serving
//! process is gone get a new one.
//!
//! Serving processes leave the plugin container's cgroup, so a restart of
//! the container does not end them; a crash of one, or a host where it
//! could not leave the cgroup, does. A kernel nbd device
//! attached over netlink outlives its process for the dead-connection
//! timeout, and a successor hands it new sockets (`NBD_CMD_RECONFIGURE`):
//! the filesystem on it sees a pause, not an I/O error. Devices attached
//! over ioctl, or as FUSE + loop, die with their process; those volumes
//! are reported (their volume condition is abnormal) until the kubelet
//! stages them again.

use tracing::Instrument;

use crate::inflight::InFlight;
use crate::node::attach::{Mapping, NbdClient};
use crate::node::state::{Staged, StateDir};

/// The attach method whose devices a new serving process can take over.
const REPLACEABLE: &str = "netlink";

/// Re-attaches every recorded volume whose kernel device lost its serving
/// process. A volume busy with a call is left to that call.
pub async fn reattach_orphans(state: &StateDir, nbd: &NbdClient, meta: &str, inflight: &InFlight) {
    let staged = match state.list() {
        Ok(staged) => staged,
        Err(err) => {
            tracing::warn!("cannot look for orphaned devices: {err}");
            return;
        }
    };
    if staged.is_empty() {
        return;
    }
    let mappings = match nbd.list().await {
        Ok(mappings) => mappings,
        Err(err) => {
            tracing::warn!("cannot look for orphaned devices: {err}");
            return;
        }
    };
    for volume in staged {
        let Some(mapping) = mappings.iter().find(|m| m.volume == volume.meta_volume_id) else { continue };
        if mapping.is_served() {
            continue;
        }
        let span = tracing::info_span!("recovery", volume = %volume.volume_id);
        reattach(&volume, mapping, nbd, meta, inflight).instrument(span).await;
    }
}

async fn reattach(volume: &Staged, mapping: &Mapping, nbd: &NbdClient, meta: &str, inflight: &InFlight) {
    if mapping.method.as_deref() != Some(REPLACEABLE) {
        tracing::warn!(
            device = %mapping.device.display(),
            method = mapping.method.as_deref().unwrap_or("unknown"),
            "the serving process is gone and this device cannot be taken over; stage the volume again"
        );
        return;
    }
    let Ok(_guard) = inflight.claim(volume.volume_id.clone()) else { return };
    match nbd.map(&volume.meta_volume_id, meta, volume.epoch, volume.readonly).await {
        Ok(device) => {
            tracing::info!(device = %device.display(), epoch = volume.epoch, "serving process replaced")
        }
        Err(err) => tracing::warn!(device = %mapping.device.display(), "replacing the serving process: {err}"),
    }
}
