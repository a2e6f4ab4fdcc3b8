#!/usr/bin/env python3
"""Writes an OCI image archive that `ctr images import` loads, without a
registry or a container engine.

    oci_image.py --ref NAME:TAG --out IMAGE.tar
                 [--layer LAYER.tar]...      a prepared layer (e.g. a root filesystem)
                 [--add SRC=DEST]...         files put into one more layer
                 [--entrypoint JSON] [--cmd JSON] [--env K=V]...

`--layer-from-dir DIR --out LAYER.tar` instead packs a directory (a
debootstrap root filesystem) into a layer tar to pass to --layer later.

Layers are written reproducibly (sorted names, zero timestamps, root
owner), so the same inputs give the same digests and a second import is a
no-op.
"""

import argparse
import hashlib
import io
import json
import os
import tarfile
import tempfile

ARCH = "amd64"


def normalized(info):
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def pack_dir(root, out):
    """A layer holding everything under root, in a stable order."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                arcname = os.path.relpath(path, root)
                info = tar.gettarinfo(path, arcname)
                if info is None:  # sockets cannot be packed
                    continue
                info.mtime = 0
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def pack_files(pairs, out):
    """A layer holding SRC files at DEST paths, with their parent directories
    and a world-writable /tmp (programs expect one)."""
    dirs = {"tmp"}
    for _, dest in pairs:
        parent = os.path.dirname(dest.strip("/"))
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            info = normalized(tarfile.TarInfo(d))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for src, dest in sorted(pairs, key=lambda p: p[1]):
            info = normalized(tar.gettarinfo(src, dest.strip("/")))
            info.mode = 0o755
            with open(src, "rb") as f:
                tar.addfile(info, f)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), os.path.getsize(path)


def normalized_ref(ref):
    """The name the kubelet asks containerd for: `name:tag` and `org/name:tag`
    are Docker Hub names (docker.io/library/name, docker.io/org/name)."""
    first, _, rest = ref.partition("/")
    if not rest:
        return "docker.io/library/" + ref
    if "." not in first and ":" not in first and first != "localhost":
        return "docker.io/" + ref
    return ref


def write_image(ref, layers, config_fields, out):
    ref = normalized_ref(ref)
    with tarfile.open(out, "w") as archive:

        def add_bytes(name, data):
            info = normalized(tarfile.TarInfo(name))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        layer_descriptors = []
        for path in layers:
            digest, size = file_digest(path)
            info = normalized(archive.gettarinfo(path, "blobs/sha256/" + digest[7:]))
            with open(path, "rb") as f:
                archive.addfile(info, f)
            layer_descriptors.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
            )
        config = json.dumps(
            {
                "architecture": ARCH,
                "os": "linux",
                "config": config_fields,
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descriptors]},
            },
            sort_keys=True,
        ).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        add_bytes("blobs/sha256/" + config_digest[7:], config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": layer_descriptors,
            },
            sort_keys=True,
        ).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        add_bytes("blobs/sha256/" + manifest_digest[7:], manifest)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": ARCH, "os": "linux"},
                    # containerd names the imported image after this.
                    "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref},
                }
            ],
        }
        add_bytes("index.json", json.dumps(index, sort_keys=True).encode())
        add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layer", action="append", default=[])
    parser.add_argument("--add", action="append", default=[])
    parser.add_argument("--layer-from-dir")
    parser.add_argument("--entrypoint")
    parser.add_argument("--cmd")
    parser.add_argument("--env", action="append", default=[])
    args = parser.parse_args()

    if args.layer_from_dir:
        pack_dir(args.layer_from_dir, args.out)
        return
    if not args.ref:
        parser.error("--ref is required")
    with tempfile.TemporaryDirectory() as tmp:
        layers = list(args.layer)
        if args.add:
            files_layer = os.path.join(tmp, "files.tar")
            pack_files([tuple(a.split("=", 1)) for a in args.add], files_layer)
            layers.append(files_layer)
        config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + args.env}
        if args.entrypoint:
            config["Entrypoint"] = json.loads(args.entrypoint)
        if args.cmd:
            config["Cmd"] = json.loads(args.cmd)
        write_image(args.ref, layers, config, args.out)


if __name__ == "__main__":
    main()
