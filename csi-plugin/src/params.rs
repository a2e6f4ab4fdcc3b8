//! StorageClass parameters, capacity ranges, and the keys of the context
//! maps the controller hands to the node.
//!
//! | parameter      | values                          | default |
//! |----------------|---------------------------------|---------|
//! | `replicas`     | 1–5                             | 3       |
//! | `fsType`       | `ext4`, `xfs`                   | `ext4`  |
//! | `chunkSizeMiB` | power of two, 1–1024            | 64      |
//!
//! Keys under `csi.storage.k8s.io/` are added by the sidecars and accepted;
//! any other key is refused, so a typo in a StorageClass fails loudly
//! instead of silently provisioning something else.
//!
//! Mutable parameters (a VolumeAttributesClass) may change while the
//! volume lives (ControllerModifyVolume); given at creation they override
//! the StorageClass:
//!
//! | parameter      | values                                     | default  |
//! |----------------|--------------------------------------------|----------|
//! | `replicas`     | 1–5                                        | as above |
//! | `maxIOPS`      | operations per second, 0 or at least 10    | no limit |
//! | `maxBandwidth` | bytes per second (`100Mi`), 0 or ≥ `1Mi`   | no limit |

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use ballast_proto::csi;
use ballast_proto::size::SizeError;

use crate::error::{CsiError, Result};

pub const REPLICAS: &str = "replicas";
pub const FS_TYPE: &str = "fsType";
pub const CHUNK_SIZE_MIB: &str = "chunkSizeMiB";
/// `"true"`: a LUKS2 container unlocked on the node with the node-stage
/// secret (also a key of the volume context).
pub const ENCRYPTED: &str = "encrypted";
pub const MAX_IOPS: &str = "maxIOPS";
pub const MAX_BANDWIDTH: &str = "maxBandwidth";
/// Prefix of the keys the Kubernetes sidecars add (PVC name, secrets, ...).
pub const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
/// Set by the kubelet in the volume context of an ephemeral inline volume.
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// Size of an ephemeral inline volume (`1Gi`, `512Mi`, bytes).
pub const SIZE: &str = "size";
/// Sidecar metadata kept with the volume so that `ballast volume get` can
/// name the claim behind it.
const KEPT_SIDECAR_KEYS: [&str; 3] =
    ["csi.storage.k8s.io/pvc/name", "csi.storage.k8s.io/pvc/namespace", "csi.storage.k8s.io/pv/name"];

/// Keys of the publish context (ControllerPublishVolume → node).
pub const CTX_EPOCH: &str = "epoch";
pub const CTX_VOLUME_ID: &str = "volumeId";
pub const CTX_READONLY: &str = "readonly";

pub use ballast_proto::volume::{BLOCK_SIZE, DEFAULT_REPLICAS, MAX_REPLICAS, MAX_VOLUME_SIZE};
use ballast_proto::volume::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE};
pub const DEFAULT_CHUNK_SIZE_MIB: u64 = DEFAULT_CHUNK_SIZE >> 20;
pub const MAX_CHUNK_SIZE_MIB: u64 = MAX_CHUNK_SIZE >> 20;

/// The smallest volume handed out: smaller requests are rounded up to it
/// (no filesystem fits in less, and mkfs.xfs wants far more).
pub const MIN_VOLUME_SIZE: u64 = 1 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = CsiError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ext4" => Ok(Self::Ext4),
            "xfs" => Ok(Self::Xfs),
            other => Err(CsiError::invalid(format!("fsType {other:?} is not supported (use ext4 or xfs)"))),
        }
    }
}

/// Validated StorageClass parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    pub replicas: u32,
    /// `None` when the StorageClass leaves it to the volume capability.
    pub fs_type: Option<FsType>,
    pub chunk_size_bytes: u64,
    /// Encrypted at rest (LUKS2, passphrase from the node-stage secret).
    pub encrypted: bool,
    /// Sidecar metadata worth keeping with the volume.
    pub labels: BTreeMap<String, String>,
}

impl Default for VolumeParams {
    fn default() -> Self {
        Self {
            replicas: DEFAULT_REPLICAS,
            fs_type: None,
            chunk_size_bytes: DEFAULT_CHUNK_SIZE_MIB << 20,
            encrypted: false,
            labels: BTreeMap::new(),
        }
    }
}

impl VolumeParams {
    /// Validates StorageClass parameters. `extra` names further keys the
    /// caller accepts (and handles itself).
    pub fn parse(parameters: &HashMap<String, String>, extra: &[&str]) -> Result<Self> {
        let mut params = Self::default();
        let mut keys: Vec<&String> = parameters.keys().collect();
        keys.sort();
        for key in keys {
            let value = parameters[key].trim();
            match key.as_str() {
                REPLICAS => params.replicas = parse_replicas(value)?,
                FS_TYPE => params.fs_type = Some(value.parse()?),
                CHUNK_SIZE_MIB => {
                    let mib: u64 = value
                        .parse()
                        .ok()
                        .filter(|n: &u64| n.is_power_of_two() && *n <= MAX_CHUNK_SIZE_MIB)
                        .ok_or_else(|| invalid_param(key, value, "a power of two from 1 to 1024"))?;
                    params.chunk_size_bytes = mib << 20;
                }
                ENCRYPTED => {
                    params.encrypted = value.parse().map_err(|_| invalid_param(key, value, "\"true\" or \"false\""))?;
                }
                k if KEPT_SIDECAR_KEYS.contains(&k) => {
                    params.labels.insert(key.clone(), value.to_string());
                }
                k if k.starts_with(SIDECAR_PREFIX) || extra.contains(&k) => {}
                k => {
                    return Err(CsiError::invalid(format!(
                        "unknown parameter {k:?} (supported: {REPLICAS}, {FS_TYPE}, {CHUNK_SIZE_MIB}, {ENCRYPTED})"
                    )))
                }
            }
        }
        Ok(params)
    }

    pub fn chunk_size_mib(&self) -> u64 {
        self.chunk_size_bytes >> 20
    }
}

/// Snapshots (single or group) take no parameters beside the sidecars'
/// keys: `what` names the kind in the error.
pub fn reject_snapshot_parameters(parameters: &HashMap<String, String>, what: &str) -> Result<()> {
    match parameters.keys().find(|k| !k.starts_with(SIDECAR_PREFIX)) {
        Some(key) => Err(CsiError::invalid(format!("unknown {what} parameter {key:?}: snapshots take none"))),
        None => Ok(()),
    }
}

/// Validated mutable parameters; `None` leaves a value as it is. The
/// metadata service checks the limits' bounds (one home for them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MutableParams {
    pub replicas: Option<u32>,
    pub max_iops: Option<u64>,
    pub max_bandwidth_bytes: Option<u64>,
}

impl MutableParams {
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self> {
        let mut params = Self::default();
        for (key, value) in parameters {
            let value = value.trim();
            match key.as_str() {
                REPLICAS => params.replicas = Some(parse_replicas(value)?),
                MAX_IOPS => {
                    params.max_iops =
                        Some(value.parse().map_err(|_| invalid_param(key, value, "operations per second"))?)
                }
                MAX_BANDWIDTH => params.max_bandwidth_bytes = Some(parse_quantity(value)?),
                k => {
                    return Err(CsiError::invalid(format!(
                        "unknown mutable parameter {k:?} (supported: {REPLICAS}, {MAX_IOPS}, {MAX_BANDWIDTH})"
                    )))
                }
            }
        }
        Ok(params)
    }

    /// The limits a new volume starts with.
    pub fn limits(&self) -> ballast_proto::meta::IoLimits {
        ballast_proto::meta::IoLimits {
            max_iops: self.max_iops.unwrap_or(0),
            max_bandwidth_bytes: self.max_bandwidth_bytes.unwrap_or(0),
        }
    }
}

fn parse_replicas(value: &str) -> Result<u32> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=MAX_REPLICAS).contains(n))
        .ok_or_else(|| invalid_param(REPLICAS, value, "an integer from 1 to 5"))
}

fn invalid_param(key: &str, value: &str, expected: &str) -> CsiError {
    CsiError::invalid(format!("parameter {key}={value:?} is invalid: expected {expected}"))
}

/// The size a capacity range asks for: `required_bytes` (or the default
/// when nothing is required) rounded up to whole 4 KiB blocks and to the
/// minimum size, within `limit_bytes`. `fallback` replaces the default, e.g.
/// the size of a clone's source.
pub fn size_for(range: Option<&csi::CapacityRange>, fallback: Option<u64>) -> Result<u64> {
    let (required, limit) = match range {
        Some(r) => (r.required_bytes, r.limit_bytes),
        None => (0, 0),
    };
    if required < 0 || limit < 0 {
        return Err(CsiError::invalid("capacity_range bytes must not be negative"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && limit < required {
        return Err(CsiError::invalid(format!("limit_bytes {limit} is less than required_bytes {required}")));
    }
    let wanted = if required > 0 {
        required
    } else {
        let default = fallback.unwrap_or(DEFAULT_VOLUME_SIZE);
        if limit != 0 {
            default.min(limit / BLOCK_SIZE * BLOCK_SIZE)
        } else {
            default
        }
    };
    let size = round_up(wanted.max(MIN_VOLUME_SIZE), BLOCK_SIZE);
    if limit != 0 && size > limit {
        return Err(CsiError::OutOfRange(format!(
            "the smallest volume satisfying required_bytes {required} is {size} bytes (4 KiB blocks, at least \
             {MIN_VOLUME_SIZE} bytes), above limit_bytes {limit}"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(CsiError::OutOfRange(format!(
            "{size} bytes exceeds the largest volume size, {MAX_VOLUME_SIZE} bytes"
        )));
    }
    Ok(size)
}

/// Whether an existing size satisfies a capacity range.
pub fn size_fits(size: u64, range: Option<&csi::CapacityRange>) -> bool {
    let Some(range) = range else { return true };
    size >= range.required_bytes.max(0) as u64 && (range.limit_bytes <= 0 || size <= range.limit_bytes as u64)
}

pub fn round_up(value: u64, multiple: u64) -> u64 {
    value.div_ceil(multiple).saturating_mul(multiple)
}

/// Parses a Kubernetes quantity (`1Gi`, `500M`, `1048576`) into bytes.
pub fn parse_quantity(text: &str) -> Result<u64> {
    ballast_proto::size::parse_quantity(text).map_err(|e| match e {
        SizeError::Invalid { .. } => CsiError::invalid(e.to_string()),
        SizeError::TooLarge(_) => CsiError::OutOfRange(e.to_string()),
    })
}

/// Topology segments as `key=value` labels, e.g. `topology.ballast.io/zone=a`.
pub type Segments = BTreeMap<String, String>;

/// Parses `key=value,key=value`.
pub fn parse_segments(text: &str) -> Result<Segments> {
    let mut segments = Segments::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| CsiError::invalid(format!("topology label {pair:?} is not key=value")))?;
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(CsiError::invalid(format!("topology label {pair:?} has an empty key")));
        }
        segments.insert(key.to_string(), value.to_string());
    }
    Ok(segments)
}

/// Whether a requested topology segment can be served from ours: every key
/// both name has the same value.
pub fn segments_compatible(ours: &Segments, requested: &HashMap<String, String>) -> bool {
    requested.iter().all(|(k, v)| ours.get(k).is_none_or(|ours| ours == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
        Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit })
    }

    #[test]
    fn parameters_have_defaults_and_bounds() {
        let p = VolumeParams::parse(&HashMap::new(), &[]).unwrap();
        assert_eq!((p.replicas, p.fs_type, p.chunk_size_bytes), (3, None, 64 << 20));

        let p = VolumeParams::parse(&map(&[("replicas", "5"), ("fsType", "xfs"), ("chunkSizeMiB", "1")]), &[]).unwrap();
        assert_eq!((p.replicas, p.fs_type, p.chunk_size_bytes), (5, Some(FsType::Xfs), 1 << 20));

        for bad in [
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "three"),
            ("fsType", "btrfs"),
            ("chunkSizeMiB", "3"),
            ("chunkSizeMiB", "2048"),
            ("chunkSizeMiB", "0"),
            ("replica", "3"),
        ] {
            let err = VolumeParams::parse(&map(&[bad]), &[]).unwrap_err();
            assert!(matches!(err, CsiError::InvalidArgument(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn sidecar_keys_are_accepted_and_claim_names_kept() {
        let p = VolumeParams::parse(
            &map(&[
                ("csi.storage.k8s.io/pvc/name", "data"),
                ("csi.storage.k8s.io/provisioner-secret-name", "s"),
                ("size", "1Gi"),
            ]),
            &["size"],
        )
        .unwrap();
        assert_eq!(p.labels.len(), 1);
        assert_eq!(p.labels["csi.storage.k8s.io/pvc/name"], "data");
    }

    #[test]
    fn capacity_ranges_round_and_bound() {
        assert_eq!(size_for(None, None).unwrap(), DEFAULT_VOLUME_SIZE);
        assert_eq!(size_for(None, Some(8 << 20)).unwrap(), 8 << 20);
        assert_eq!(size_for(range(1, 0).as_ref(), None).unwrap(), MIN_VOLUME_SIZE);
        assert_eq!(size_for(range((2 << 20) + 1, 0).as_ref(), None).unwrap(), (2 << 20) + 4096);
        assert_eq!(size_for(range(0, 16 << 20).as_ref(), None).unwrap(), 16 << 20);
        assert_eq!(size_for(range(5 << 20, 5 << 20).as_ref(), None).unwrap(), 5 << 20);
        assert!(matches!(size_for(range(10, 5).as_ref(), None), Err(CsiError::InvalidArgument(_))));
        assert!(matches!(size_for(range(-1, 0).as_ref(), None), Err(CsiError::InvalidArgument(_))));
        assert!(matches!(size_for(range(1000, 2000).as_ref(), None), Err(CsiError::OutOfRange(_))));
        assert!(matches!(size_for(range((2 << 20) + 1, (2 << 20) + 2).as_ref(), None), Err(CsiError::OutOfRange(_))));
        assert!(matches!(size_for(range(i64::MAX, 0).as_ref(), None), Err(CsiError::OutOfRange(_))));

        assert!(size_fits(1 << 30, range(1 << 20, 0).as_ref()));
        assert!(!size_fits(1 << 30, range(1 << 20, 1 << 29).as_ref()));
        assert!(!size_fits(1 << 20, range(1 << 30, 0).as_ref()));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity("4096").unwrap(), 4096);
        assert!(parse_quantity("1Qi").is_err());
        assert!(parse_quantity("Gi").is_err());
    }

    #[test]
    fn topology_segments() {
        let ours = parse_segments("topology.ballast.io/cluster=prod, zone=a").unwrap();
        assert_eq!(ours.len(), 2);
        assert!(segments_compatible(&ours, &map(&[("zone", "a")])));
        assert!(!segments_compatible(&ours, &map(&[("zone", "b")])));
        assert!(segments_compatible(&ours, &map(&[("other", "x")])));
        assert!(parse_segments("novalue").is_err());
        assert!(parse_segments("").unwrap().is_empty());
    }
}
