//! Attachments: a volume published to a node, within the node's limit,
//! and unpublished.

use crate::error::MetaError;
use crate::model::Attachment;
use crate::types::Outcome;

use super::MetaState;

impl MetaState {
    pub(super) fn publish(&mut self, volume_id: &str, node_id: &str, readonly: bool) -> Result<Outcome, MetaError> {
        if volume_id.is_empty() || node_id.is_empty() {
            return Err(MetaError::invalid("volume id and node id are required"));
        }
        let volume =
            self.volumes.get_mut(volume_id).ok_or_else(|| MetaError::not_found(format!("volume {volume_id}")))?;
        let already = self.attachments.get(volume_id).and_then(|nodes| nodes.get(node_id)).is_some();
        if let Some(limit) = self.nodes.get(node_id).map(|n| n.max_volumes).filter(|max| *max > 0) {
            let published = self.attachments.values().filter(|nodes| nodes.contains_key(node_id)).count() as u64;
            if !already && published >= limit {
                return Err(MetaError::ResourceExhausted(format!(
                    "node {node_id} already has {published} volumes published, its limit"
                )));
            }
        }
        let nodes = self.attachments.entry(volume_id.to_string()).or_default();
        if let Some(existing) = nodes.get(node_id) {
            return if existing.readonly == readonly {
                Ok(Outcome::Attachment(existing.clone()))
            } else {
                Err(MetaError::AlreadyExists(format!(
                    "volume {volume_id} is already published to node {node_id} with readonly={}",
                    existing.readonly
                )))
            };
        }
        // One writer, or any number of readers: never both.
        if let Some(other) = nodes.values().find(|a| !a.readonly || !readonly) {
            let other = other.node_id.clone();
            if nodes.is_empty() {
                self.attachments.remove(volume_id);
            }
            return Err(MetaError::FailedPrecondition(format!(
                "volume {volume_id} is published to node {other}; a writable volume is attached to one node at a time"
            )));
        }
        // Readers share one epoch, so a new reader fences none of those
        // already reading; the first attachment after a writer (or none)
        // raises it, which fences the writer.
        if nodes.is_empty() {
            volume.epoch += 1;
        }
        let attachment = Attachment {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            epoch: volume.epoch,
            readonly,
        };
        nodes.insert(node_id.to_string(), attachment.clone());
        Ok(Outcome::Attachment(attachment))
    }

    pub(super) fn unpublish(&mut self, volume_id: &str, node_id: &str) -> Result<Outcome, MetaError> {
        if volume_id.is_empty() || node_id.is_empty() {
            return Err(MetaError::invalid("volume id and node id are required"));
        }
        let existed = match self.attachments.get_mut(volume_id) {
            Some(nodes) => {
                let existed = nodes.remove(node_id).is_some();
                if nodes.is_empty() {
                    self.attachments.remove(volume_id);
                }
                existed
            }
            None => false,
        };
        Ok(Outcome::Existed(existed))
    }
}
