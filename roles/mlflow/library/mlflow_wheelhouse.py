#!/usr/bin/python
"""Ansible module: the wheelhouse of a lock, on the controller (run with delegate_to: localhost)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: mlflow_wheelhouse
short_description: Gather the wheels of a hash lock on the controller and pack them for the hosts
description:
  - Reads a lock written by C(files/tools/lock.py) (one wheel per package, with its sha256 and file name).
  - Keeps a cache of verified wheels in O(cache_dir). A wheel is taken from O(src) (a directory or a tar
    archive, for controllers without internet), or else downloaded from the package index by its exact
    file name. Every wheel is checked against the lock's sha256; a file that differs is refused with its name.
  - Writes O(archive), an uncompressed tar of the lock's wheels, once; the hosts install from it with no index.
options:
  lock: {description: Path of the lock file., type: path, required: true}
  cache_dir: {description: Directory of verified wheels (shared by all locks)., type: path, required: true}
  archive: {description: The tar archive to write., type: path, required: true}
  src: {description: A wheelhouse to take the wheels from instead of the index (directory or tar)., type: path}
  index_urls:
    description: PEP 503/691 simple indexes, searched in order for each file.
    type: list
    elements: str
    default: [https://pypi.org/simple]
"""

RETURN = r"""
archive: {description: Path of the archive., type: str, returned: always}
wheels: {description: Number of wheels in the lock., type: int, returned: always}
fetched: {description: File names downloaded or copied into the cache in this run., type: list, returned: always}
"""

import concurrent.futures
import hashlib
import html.parser
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

LINE = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+) --hash=sha256:(?P<sha256>[0-9a-f]{64})$")


def read_lock(path):
    """{'requires': [...], 'packages': [{name, version, sha256, filename}]}; raises ValueError if malformed."""
    header, packages, filename = None, [], None
    with open(path) as f:
        for number, line in enumerate(f.read().splitlines(), 1):
            if line.startswith("# requires: "):
                header = line[len("# requires: "):].split()
            elif line.startswith("# ") and line.endswith(".whl"):
                filename = line[2:]
            elif line and not line.startswith("#"):
                match = LINE.match(line)
                if not match or not filename:
                    raise ValueError(f"{path}:{number}: not 'name==version --hash=sha256:...' after a wheel name")
                packages.append({**match.groupdict(), "filename": filename})
                filename = None
    if header is None:
        raise ValueError(f"{path}: no '# requires:' header")
    return {"requires": header, "packages": packages}


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Links(html.parser.HTMLParser):
    """PEP 503 HTML: file name -> href."""

    def __init__(self):
        super().__init__()
        self.files, self._href = {}, None

    def handle_starttag(self, tag, attrs):
        self._href = dict(attrs).get("href") if tag == "a" else None

    def handle_data(self, data):
        if self._href and data.strip():
            self.files[data.strip()] = self._href


class Refused(Exception):
    """A wheel that cannot be had or does not match the lock; ends the module with its message."""


class Wheelhouse:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.fetched = []
        self._index = {}

    def fail(self, msg):
        raise Refused(msg)

    def open(self, url, accept="*/*"):
        return open_url(url, headers={"Accept": accept}, timeout=120, http_agent="ansible-mlflow-wheelhouse")

    def files_on(self, index, project):
        """{file name: URL} of a project on one simple index (PEP 691 JSON, else PEP 503 HTML)."""
        key = (index, project)
        if key not in self._index:
            page = index.rstrip("/") + "/" + project + "/"
            try:
                response = self.open(page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1")
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    raise
                self._index[key] = {}
                return {}
            body = response.read().decode()
            if "json" in response.headers.get("Content-Type", ""):
                files = {f["filename"]: f["url"] for f in json.loads(body)["files"]}
            else:
                parser = Links()
                parser.feed(body)
                files = parser.files
            self._index[key] = {name: urllib.parse.urljoin(page, url) for name, url in files.items()}
        return self._index[key]

    def url_of(self, package):
        """The download URL of the package's locked file, from the first index that has it."""
        project = re.sub(r"[-_.]+", "-", package["name"]).lower()
        for index in self.params["index_urls"]:
            url = self.files_on(index, project).get(package["filename"])
            if url:
                return url.split("#")[0]
        self.fail(f"{package['filename']} is on none of the indexes {self.params['index_urls']}: "
                  "the lock and the index disagree")

    def from_src(self, package, dest):
        src = self.params["src"]
        if os.path.isdir(src):
            path = os.path.join(src, package["filename"])
            if not os.path.isfile(path):
                self.fail(f"the wheelhouse {src} has no {package['filename']} (the lock needs "
                          f"{package['name']}=={package['version']}); build it from this lock")
            shutil.copyfile(path, dest)
            return path
        with tarfile.open(src) as tar:
            member = next((m for m in tar.getmembers()
                           if m.isfile() and os.path.basename(m.name) == package["filename"]), None)
            if member is None:
                self.fail(f"the wheelhouse {src} has no {package['filename']} (the lock needs "
                          f"{package['name']}=={package['version']}); build it from this lock")
            with tar.extractfile(member) as source, open(dest, "wb") as target:
                shutil.copyfileobj(source, target)
        return f"{src}:{member.name}"

    def download(self, package, dest):
        url = self.url_of(package)
        with self.open(url) as response, open(dest, "wb") as target:
            shutil.copyfileobj(response, target, 1 << 20)
        return url

    def ensure(self, package):
        cache = self.params["cache_dir"]
        final = os.path.join(cache, package["filename"])
        if not self.params["src"] and os.path.isfile(final) and sha256_of(final) == package["sha256"]:
            return
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".partial-")
        os.close(fd)
        try:
            origin = self.from_src(package, tmp) if self.params["src"] else self.download(package, tmp)
            actual = sha256_of(tmp)
            if actual != package["sha256"]:
                self.fail(f"{package['filename']} from {origin} has sha256 {actual}, but the lock "
                          f"{self.params['lock']} requires {package['sha256']}: the file was changed or "
                          "corrupted; it is refused and nothing was installed")
            if not (os.path.isfile(final) and sha256_of(final) == actual):
                os.replace(tmp, final)
                self.fetched.append(package["filename"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def pack(self, packages, archive):
        """An uncompressed tar of the wheels (wheels are zip files already), written atomically."""
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(archive), prefix=".partial-")
        os.close(fd)
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for package in sorted(packages, key=lambda p: p["filename"]):
                    info = tar.gettarinfo(os.path.join(self.params["cache_dir"], package["filename"]),
                                          arcname=package["filename"])
                    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "root", "root", 0o644
                    with open(os.path.join(self.params["cache_dir"], package["filename"]), "rb") as f:
                        tar.addfile(info, f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, archive)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def main():
    module = AnsibleModule(
        argument_spec={
            "lock": {"type": "path", "required": True},
            "cache_dir": {"type": "path", "required": True},
            "archive": {"type": "path", "required": True},
            "src": {"type": "path"},
            "index_urls": {"type": "list", "elements": "str", "default": ["https://pypi.org/simple"]},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        lock = read_lock(params["lock"])
    except (OSError, ValueError) as error:
        module.fail_json(msg=f"cannot read the lock: {error}")
    if params["src"] and not os.path.exists(params["src"]):
        module.fail_json(msg=f"the wheelhouse {params['src']} (mlflow_wheelhouse_src) does not exist on the controller")
    os.makedirs(params["cache_dir"], exist_ok=True)
    house = Wheelhouse(module)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(house.ensure, lock["packages"]))
    except Refused as error:
        module.fail_json(msg=str(error), fetched=house.fetched)
    except (OSError, urllib.error.URLError) as error:
        module.fail_json(msg=f"cannot gather the wheels of {params['lock']}: {error}", fetched=house.fetched)
    archive = params["archive"]
    packed = bool(house.fetched) or not os.path.isfile(archive)
    if packed:
        house.pack(lock["packages"], archive)
    module.exit_json(changed=packed, archive=archive, wheels=len(lock["packages"]), fetched=house.fetched)


if __name__ == "__main__":
    main()
