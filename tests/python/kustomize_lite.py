"""A small kustomize: exactly the features deploy/k8s uses, no more.

tests/python/test_deploy.py renders the overlays with `kubectl kustomize`
when kubectl is on PATH and asserts that this module renders the same
objects, so the two cannot drift; on a machine without kubectl the tests
use this rendering alone. A kustomization that uses anything else is an
error here (UnsupportedFeature), not a silent difference: add the feature
(small) or keep the manifests to this set.

Supported kustomization fields:
  resources        YAML files and directories holding a kustomization
  images           name -> newName / newTag / digest, in containers and
                   initContainers
  patches          strategic-merge patches from files (`path:`), applied to
                   the object of the same kind and name, or with `target:`
                   (kind, name as an anchored regex) to every match
  secretGenerator  `literals:` with options.disableNameSuffixHash: true
Strategic merge as kustomize does it: maps merge, null deletes a key,
lists of containers, initContainers, env, volumes, volumeMounts and ports
of built-in kinds merge by their key (patch items first, in patch order,
then the other items of the original), other lists are replaced; custom
resources (no schema) replace every list.

    python3 tests/python/kustomize_lite.py deploy/k8s/overlays/dev
"""

from __future__ import annotations

import base64
import copy
import re
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "images", "patches", "secretGenerator"}

# Merge keys of the lists that strategic merge merges (in built-in kinds).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
# API groups of built-in kinds (kustomize knows their schemas).
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io", "autoscaling",
                  "rbac.authorization.k8s.io"}


class UnsupportedFeature(Exception):
    pass


def _group(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def _merge(base, patch, builtin: bool):
    """Strategic merge of patch into base (both maps); returns a new map."""
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise UnsupportedFeature(f"strategic merge directive {key}")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = _merge(out.get(key), value, builtin)
        elif isinstance(value, list) and builtin and key in MERGE_KEYS and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key], builtin)
        elif isinstance(value, list):
            out[key] = [_merge({}, v, builtin) if isinstance(v, dict) else copy.deepcopy(v) for v in value]
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list, patch: list, key: str, builtin: bool) -> list:
    by_key = {item.get(key): item for item in base if isinstance(item, dict)}
    out, used = [], set()
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise UnsupportedFeature(f"list item without its merge key {key!r}: {item!r}")
        k = item[key]
        out.append(_merge(by_key.get(k), item, builtin))
        used.add(k)
    out.extend(copy.deepcopy(item) for item in base
               if not (isinstance(item, dict) and item.get(key) in used))
    return out


def split_image(image: str):
    """name, tag, digest of an image reference."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    name, tag = image, None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        name, tag = image[:colon], image[colon + 1:]
    return name, tag, digest


def _set_images(obj, images: list) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        c["image"] = _new_image(c["image"], images)
            _set_images(value, images)
    elif isinstance(obj, list):
        for value in obj:
            _set_images(value, images)


def _new_image(image: str, images: list) -> str:
    name, tag, digest = split_image(image)
    for rule in images:
        if rule["name"] != name:
            continue
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise UnsupportedFeature(f"images fields {sorted(unknown)}")
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        if "newTag" in rule:
            tag, digest = str(rule["newTag"]), None
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return image


def _secret(gen: dict) -> dict:
    unknown = set(gen) - {"name", "literals", "options"}
    if unknown:
        raise UnsupportedFeature(f"secretGenerator fields {sorted(unknown)}")
    options = gen.get("options") or {}
    if set(options) - {"disableNameSuffixHash"} or not options.get("disableNameSuffixHash"):
        raise UnsupportedFeature("secretGenerator without options.disableNameSuffixHash: true")
    data = {}
    for lit in gen.get("literals") or []:
        k, sep, v = lit.partition("=")
        if not sep:
            raise ValueError(f"secretGenerator literal without '=': {lit!r}")
        data[k] = base64.b64encode(v.encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]},
            "type": "Opaque", "data": data}


def _load_yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no kustomization.yaml in {directory}")


def _id(obj: dict):
    return (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("namespace"),
            obj.get("metadata", {}).get("name"))


def _matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise UnsupportedFeature(f"patch target fields {sorted(unknown)}")
    if "kind" in target and obj.get("kind") != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], obj["metadata"]["name"]):
        return False
    return True


def build(directory) -> list:
    """Renders the kustomization in directory: a list of objects."""
    directory = Path(directory)
    kfile = _kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedFeature(f"{kfile}: kustomization fields {sorted(unknown)}")

    objects: list = []
    for res in k.get("resources") or []:
        path = directory / res
        objects.extend(build(path) if path.is_dir() else _load_yaml_docs(path))
    for gen in k.get("secretGenerator") or []:
        objects.append(_secret(gen))

    seen = set()
    for obj in objects:
        if _id(obj) in seen:
            raise ValueError(f"{kfile}: {_id(obj)} is defined twice")
        seen.add(_id(obj))

    for p in k.get("patches") or []:
        if set(p) - {"path", "target"}:
            raise UnsupportedFeature(f"patches fields {sorted(set(p) - {'path', 'target'})}")
        docs = _load_yaml_docs(directory / p["path"])
        if len(docs) != 1:
            raise UnsupportedFeature(f"{p['path']}: one patch per file")
        patch = docs[0]
        body = {key: v for key, v in patch.items() if key not in ("apiVersion", "kind", "metadata")}
        target = p.get("target")
        hits = 0
        for i, obj in enumerate(objects):
            if target is not None:
                hit = _matches(obj, target)
            else:
                hit = (obj.get("kind") == patch.get("kind")
                       and obj["metadata"]["name"] == patch["metadata"]["name"])
            if hit:
                builtin = _group(obj.get("apiVersion", "")) in BUILTIN_GROUPS
                objects[i] = _merge(obj, body, builtin)
                hits += 1
        if hits == 0:
            raise ValueError(f"{kfile}: patch {p['path']} matches no object")

    images = k.get("images") or []
    if images:
        for obj in objects:
            _set_images(obj, images)
    return objects


def main(argv) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(build(argv[1]), sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
