# SPDX-License-Identifier: Apache-2.0
"""`data.files.path_in_root`: the one containment rule for paths read from a file's content."""

from __future__ import annotations

from pathlib import Path

import pytest

from mrad_hf.data.files import PathOutsideRoot, path_in_root


def test_paths_read_from_files_stay_inside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True), outside.mkdir()
    (root / "out").symlink_to(outside, target_is_directory=True)
    (root / "in").symlink_to(root / "a", target_is_directory=True)
    assert path_in_root(root, "a/x.png") == root / "a" / "x.png"  # lexical: ids stay relative to the root
    assert path_in_root(root, "in/x.png") == root / "in" / "x.png"  # a symlink that stays inside is fine
    for relative, kind in [
        ("/etc/passwd", "absolute"),
        ("~/x.png", "absolute"),
        ("C:\\x.png", "absolute"),
        ("a/../../outside/x.png", "parent"),
        ("a\\..\\x.png", "parent"),
        ("out/x.png", "symlink"),
        ("a/x\0.png", "unusable"),
    ]:
        with pytest.raises(PathOutsideRoot) as info:
            path_in_root(root, relative)
        assert info.value.kind == kind, relative
