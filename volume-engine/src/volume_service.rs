//! Opening a volume for serving: find it, obtain the attachment's fencing
//! epoch (given by the caller, e.g. the CSI plugin, or by publishing the
//! volume to this node), and start the engine.

use std::sync::Arc;
use std::time::Duration;

use ballast_proto::meta as pb;
use meta_client::MetaClient;

use crate::engine::{EngineError, EngineOptions, Volume};

#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The attachment epoch; `None` publishes the volume to `node_id`.
    pub epoch: Option<u64>,
    pub node_id: String,
    pub readonly: bool,
    pub min_replicas: usize,
    pub replica_timeout: Duration,
}

/// An open volume and, if this process published it, the attachment to
/// release when it stops.
pub struct Opened {
    pub volume: Arc<Volume>,
    pub published: Option<pb::Attachment>,
}

pub async fn open(meta: &MetaClient, volume: &str, options: &OpenOptions) -> Result<Opened, EngineError> {
    let info = meta.find_volume(volume).await?;
    let (epoch, published) = match options.epoch {
        Some(epoch) => (epoch, None),
        None => {
            let request = pb::PublishVolumeRequest {
                volume_id: info.id.clone(),
                node_id: options.node_id.clone(),
                readonly: options.readonly,
            };
            let attachment = meta.publish_volume(request).await?;
            (attachment.epoch, Some(attachment))
        }
    };
    let engine_options = EngineOptions {
        epoch,
        min_replicas: options.min_replicas,
        replica_timeout: options.replica_timeout,
        readonly: options.readonly,
    };
    let volume = Arc::new(Volume::open(meta.clone(), &info.id, engine_options).await?);
    Volume::keep_following(&volume);
    Ok(Opened { volume, published })
}

impl Opened {
    /// Takes on an attachment a predecessor made for `node_id` at `epoch`:
    /// this process unpublishes it when it stops.
    pub fn inherit_publication(&mut self, node_id: &str, epoch: u64, readonly: bool) {
        self.published = Some(pb::Attachment {
            volume_id: self.volume.info().id.clone(),
            node_id: node_id.to_owned(),
            epoch,
            readonly,
        });
    }

    /// Gives back an attachment this process made itself.
    pub async fn unpublish(&self, meta: &MetaClient) {
        if let Some(attachment) = &self.published {
            let request = pb::UnpublishVolumeRequest {
                volume_id: attachment.volume_id.clone(),
                node_id: attachment.node_id.clone(),
            };
            if let Err(e) = meta.unpublish_volume(request).await {
                tracing::warn!(volume = %attachment.volume_id, error = %e, "unpublishing the volume");
            }
        }
    }
}
