import subprocess
import sys

from testutils import REPO


def test_platform_dir_does_not_shadow_stdlib_platform():
    """platform/ is a source root without __init__.py: `import platform` from the repo root is stdlib's."""
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import platform, lorafleet; print(platform.system(), lorafleet.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    system, path = out.split()
    assert system == "Linux"
    assert path.startswith(str(REPO / "platform" / "lorafleet"))
