"""A local Hub for the tests, on 127.0.0.1 only: olah (a Hub-compatible server from PyPI) for reading,
`CommitServer` (the Hub's commit API, written here) for publishing, both on one set of git repositories.

olah in offline mode serves the git repositories under `<root>/mirrors/models/<org>/<name>` over the Hub's
HTTP API (`/api/models/...`, `/<repo>/resolve/<revision>/<file>`), so huggingface_hub with
`HF_ENDPOINT=<olah endpoint>` downloads from it as from huggingface.co; it never calls huggingface.co.
olah has no upload API, so `CommitServer` implements the part of the Hub's write API that HfApi uses
(create repo, preupload, NDJSON commit) and turns each commit into a git commit in the repository olah
serves: timm's push_to_hf_hub then runs unchanged with `HF_ENDPOINT=<commit endpoint>`.
Both servers take free ports, olah's start-up is bounded, and `stop()` ends them.
"""
import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

OLAH_CLI = Path(sys.executable).with_name('olah-cli')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME='isomix-test', GIT_AUTHOR_EMAIL='test@localhost',
               GIT_COMMITTER_NAME='isomix-test', GIT_COMMITTER_EMAIL='test@localhost', GIT_CONFIG_GLOBAL=os.devnull)
    return subprocess.run(['git', '-C', str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


class CommitServer:
    """The write side of the Hub's HTTP API, committing into the git repositories an OlahHub serves.

    Implements what huggingface_hub's HfApi uses to publish (timm's push_to_hf_hub, then upload_file):
    `POST /api/repos/create`, `GET /api/models/<repo>` (repo_exists), `HEAD /<repo>/resolve/<rev>/<file>`
    (file_exists), `POST /api/models/<repo>/preupload/<rev>` (every file 'regular': sent inline, no LFS/Xet)
    and `POST /api/models/<repo>/commit/<rev>` (the NDJSON commit: one git commit). Branch `main` only.
    Runs in a thread of the test process on 127.0.0.1; `endpoint` is the HF_ENDPOINT for the publisher.
    """

    def __init__(self, hub: 'OlahHub'):
        self.hub = hub
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self.endpoint = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> 'CommitServer':
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _reply(self, status: int, body: Optional[dict] = None, headers: Optional[dict] = None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                for k, v in {'Content-Type': 'application/json', **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header('Content-Length', str(len(data) if self.command != 'HEAD' else 0))
                self.end_headers()
                if self.command != 'HEAD':
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get('Content-Length') or 0))

            def _repo(self, repo_id: str) -> Path:
                return server.hub.mirrors / 'models' / repo_id

            def do_POST(self):
                path = self.path.split('?')[0]
                if path == '/api/repos/create':
                    body = json.loads(self._body())
                    repo_id = '/'.join(p for p in (body.get('organization'), body['name']) if p)
                    server.hub.create_repo(repo_id)
                    return self._reply(200, {'url': f'{server.endpoint}/{repo_id}', 'name': repo_id})
                if path == '/api/validate-yaml':  # the model card's metadata block must be a YAML mapping
                    import yaml
                    content = json.loads(self._body())['content']
                    block = re.match(r'---\n(.*?)\n---\n', content, flags=re.S)
                    try:
                        ok = block is not None and isinstance(yaml.safe_load(block.group(1)), dict)
                    except yaml.YAMLError:
                        ok = False
                    if not ok:
                        return self._reply(400, {'errors': [{'message': 'no YAML mapping between --- lines'}]})
                    return self._reply(200, {'errors': [], 'warnings': []})
                m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)', path)
                if not m or m.group(3) != 'main' or not (self._repo(m.group(1)) / '.git').is_dir():
                    return self._reply(404, {'error': f'not served here: {path}'}, {'X-Error-Code': 'RepoNotFound'})
                body = self._body()
                if m.group(2) == 'preupload':
                    files = json.loads(body)['files']
                    return self._reply(200, {'files': [
                        {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
                files, message = {}, 'commit'
                for line in body.splitlines():
                    item = json.loads(line)
                    if item['key'] == 'header':
                        message = item['value'].get('summary') or message
                    elif item['key'] == 'file' and item['value'].get('encoding') == 'base64':
                        files[item['value']['path']] = base64.b64decode(item['value']['content'])
                    else:
                        return self._reply(400, {'error': f'unsupported commit operation {item["key"]}'})
                sha = server.hub.commit_files(m.group(1), files, message)
                return self._reply(200, {'commitUrl': f'{server.endpoint}/{m.group(1)}/commit/{sha}',
                                         'commitOid': sha, 'pullRequestUrl': None})

            def do_GET(self):
                m = re.fullmatch(r'/api/models/([^/]+/[^/]+)(/revision/main)?', self.path.split('?')[0])
                if m and (self._repo(m.group(1)) / '.git').is_dir():
                    return self._reply(200, {'id': m.group(1), 'private': False})
                return self._reply(404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})

            def do_HEAD(self):
                m = re.fullmatch(r'/([^/]+/[^/]+)/resolve/main/(.+)', self.path.split('?')[0])
                if not m or not (self._repo(m.group(1)) / '.git').is_dir():
                    return self._reply(404, None, {'X-Error-Code': 'RepoNotFound'})
                file = self._repo(m.group(1)) / m.group(2)
                if not file.is_file():
                    return self._reply(404, None, {'X-Error-Code': 'EntryNotFound'})
                return self._reply(200, None, {'ETag': f'"{file.stat().st_size}"', 'X-Repo-Commit': '0' * 40})
        return Handler


class OlahHub:
    """olah serving `<root>/mirrors` offline on 127.0.0.1; `endpoint` is the value for HF_ENDPOINT."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors = self.root / 'mirrors'
        self.port = 0
        self.process: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def start(self, timeout: float = 60.) -> 'OlahHub':
        (self.mirrors / 'models').mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.root / 'olah.toml'
        # metadata-cache-ttl 0: a second commit to a repository is visible at once
        config.write_text(
            '[basic]\n'
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "cache"}"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            'metadata-cache-ttl = 0\n'
            '[accessibility]\noffline = true\n')
        self.log = open(self.root / 'olah.log', 'wb')
        self.process = subprocess.Popen(
            [str(OLAH_CLI), '-c', str(config), '--log-path', str(self.root / 'logs')],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'olah exited with {self.process.returncode}: '
                                   f'{(self.root / "olah.log").read_text(errors="replace")[-2000:]}')
            try:
                # any HTTP answer means it is serving (an unknown repo answers 401/404)
                urllib.request.urlopen(f'{self.endpoint}/api/models/none/none', timeout=2)
                return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f'olah did not answer on {self.endpoint} within {timeout} s')

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if getattr(self, 'log', None):
            self.log.close()

    def create_repo(self, repo_id: str) -> Path:
        repo = self.mirrors / 'models' / repo_id
        if not (repo / '.git').is_dir():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, 'init', '-q', '-b', 'main')
        return repo

    def commit_files(self, repo_id: str, files: dict, message: str = 'Add model') -> str:
        """Commit {path in repo: bytes} (added or replaced) to the repository `repo_id`; return the commit sha."""
        repo = self.create_repo(repo_id)
        for name, data in files.items():
            target = repo / name
            if repo.resolve() not in target.resolve().parents:
                raise ValueError(f'path outside the repository: {name}')
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        _git(repo, 'add', '-A')
        _git(repo, 'commit', '-q', '--allow-empty', '-m', message)  # republishing the same files is a commit too
        return _git(repo, 'rev-parse', 'HEAD').strip()

    def commit_folder(self, repo_id: str, folder: Path, message: str = 'Add model') -> str:
        """Commit the files of `folder` to the repository `repo_id`; return the commit sha."""
        folder = Path(folder)
        return self.commit_files(repo_id, {str(p.relative_to(folder)): p.read_bytes()
                                           for p in folder.rglob('*') if p.is_file()}, message)


def write_train_checkpoint(folder: Path, arch: str = 'isomix_iso_64_8_p2', ema: bool = True, heatmap: bool = True,
                           seed: int = 0, **model_kwargs) -> Path:
    """A train.py checkpoint (the lead's contract) of a tiny built model with random weights, in `folder`.

    Every floating tensor is random (not the zero-init residual branches), so a wrong or partial load
    changes the outputs; the EMA weights differ from the raw ones. Returns the checkpoint path.
    """
    import torch
    import timm
    import timm_isomix  # noqa: F401
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_args = dict(num_classes=10, in_chans=3, **model_kwargs)
    model = timm.create_model(arch, **model_args)
    model_args.update(model.schedule_args())
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = torch.randn(v.shape, generator=gen) * 0.2
            if k.endswith('running_var'):
                v = v.abs() + 0.5
        state[k] = v
    ckpt = dict(
        epoch=3, arch=arch, model_args=model_args, state_dict=state,
        args=dict(model=arch, dataset='', data_dir='/data/cifar10', epochs=4, batch_size=64, opt='sgd', lr=0.1,
                  weight_decay=2e-5, sched='cosine', model_ema=ema),
        metric=55.5, results=dict(top1=55.5, top5=94.25, loss=1.3),
        data_config=dict(input_size=[3, 32, 32], mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], crop_pct=1.0,
                         interpolation='bicubic'),
        optimizer={}, scheduler=None)
    if ema:
        ckpt['state_dict_ema'] = {k: v + 0.05 if v.is_floating_point() else v for k, v in state.items()}
    path = folder / 'model_best.pth.tar'
    torch.save(ckpt, path)
    if heatmap:
        Image.new('RGB', (40, 30), (30, 120, 200)).save(folder / 'mixtures.png')
    return path
