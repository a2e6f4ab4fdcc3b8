//! How each object prints: a JSON object for `-o json`, a table row otherwise.

use ballast_proto::meta as pb;
use serde_json::{json, Value};

use ballast_proto::size::format_size;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

pub fn volume(v: &pb::Volume) -> Value {
    let source = v.content_source.as_ref().and_then(|s| s.source.as_ref()).map(|s| match s {
        pb::content_source::Source::SnapshotId(id) => json!({"snapshot": id}),
        pb::content_source::Source::VolumeId(id) => json!({"volume": id}),
    });
    let limits = v.limits.unwrap_or_default();
    json!({
        "id": v.id, "name": v.name, "size_bytes": v.size_bytes, "replicas": v.replicas,
        "chunk_size_bytes": v.chunk_size_bytes, "parameters": v.parameters, "source": source,
        "created_at_ms": v.created_at_ms,
        "limits": {"max_iops": limits.max_iops, "max_bandwidth_bytes": limits.max_bandwidth_bytes},
    })
}

/// How many of a volume's allocated chunks have the copies it asks for:
/// after more replicas were asked for, how far the rebuild got.
pub struct Copies {
    pub allocated: usize,
    pub whole: usize,
}

impl Copies {
    pub fn of(v: &pb::Volume, map: &pb::ChunkMap) -> Copies {
        let whole = map.chunks.iter().filter(|set| set.replicas.len() >= v.replicas as usize).count();
        Copies { allocated: map.chunks.len(), whole }
    }
}

pub fn volume_with_copies(v: &pb::Volume, copies: &Copies) -> Value {
    let mut value = volume(v);
    value["chunks"] = json!({"allocated": copies.allocated, "with_all_replicas": copies.whole});
    value
}

pub fn volume_detail_row(v: &pb::Volume, copies: &Copies) -> Vec<String> {
    let mut row = volume_row(v);
    row.push(format!("{}/{}", copies.whole, copies.allocated));
    let limits = v.limits.unwrap_or_default();
    let iops = if limits.max_iops == 0 { "-".to_string() } else { limits.max_iops.to_string() };
    let bandwidth = if limits.max_bandwidth_bytes == 0 {
        "-".to_string()
    } else {
        format!("{}/s", format_size(limits.max_bandwidth_bytes))
    };
    row.extend([iops, bandwidth]);
    row
}

pub fn snapshot(s: &pb::Snapshot) -> Value {
    json!({
        "id": s.id, "name": s.name, "source_volume_id": s.source_volume_id, "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use, "created_at_ms": s.created_at_ms,
    })
}

pub fn chunk_server(s: &pb::ChunkServer) -> Value {
    json!({
        "id": s.id, "address": s.address, "capacity_bytes": s.capacity_bytes, "used_bytes": s.used_bytes,
        "allocated_bytes": s.allocated_bytes, "labels": s.labels, "draining": s.draining, "alive": s.alive,
    })
}

pub fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub fn volume_row(v: &pb::Volume) -> Vec<String> {
    vec![v.id.clone(), v.name.clone(), format_size(v.size_bytes), v.replicas.to_string()]
}

pub fn snapshot_row(s: &pb::Snapshot) -> Vec<String> {
    vec![
        s.id.clone(),
        s.name.clone(),
        s.source_volume_id.clone(),
        format_size(s.size_bytes),
        s.ready_to_use.to_string(),
    ]
}

pub const VOLUME_HEADER: &[&str] = &["ID", "NAME", "SIZE", "REPLICAS"];
/// `volume get`: also how many allocated chunks have every replica, and
/// the I/O limits.
pub const VOLUME_DETAIL_HEADER: &[&str] =
    &["ID", "NAME", "SIZE", "REPLICAS", "WHOLE CHUNKS", "MAX IOPS", "MAX BANDWIDTH"];
pub const SNAPSHOT_HEADER: &[&str] = &["ID", "NAME", "SOURCE", "SIZE", "READY"];
