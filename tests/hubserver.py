"""A local Hub for the tests: olah (a third-party Hub-compatible server, from PyPI) serving git repositories.

olah in offline mode serves the git repositories under `<root>/mirrors/models/<org>/<name>` over the Hub's
HTTP API (`/api/models/...`, `/<repo>/resolve/<revision>/<file>`), so huggingface_hub with
`HF_ENDPOINT=http://127.0.0.1:<port>` downloads from it as from huggingface.co. olah has no upload
(commit) API: publishing into it means committing the folder push_to_hf_hub uploads into that git
repository (`commit_folder`). The server runs on 127.0.0.1 on a free port, with a bounded start-up time,
and is stopped by `stop()`; nothing leaves the machine (`offline = true`: olah never calls huggingface.co).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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

    def commit_folder(self, repo_id: str, folder: Path, message: str = 'Add model') -> str:
        """Commit the files of `folder` (added or replaced) to the repository `repo_id`; return the commit sha."""
        repo = self.mirrors / 'models' / repo_id
        if not (repo / '.git').is_dir():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, 'init', '-q', '-b', 'main')
        for path in Path(folder).rglob('*'):
            if path.is_file():
                target = repo / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        _git(repo, 'add', '-A')
        _git(repo, 'commit', '-q', '-m', message)
        return _git(repo, 'rev-parse', 'HEAD').strip()


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
