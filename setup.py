"""One build hook, for man pages in editable installs (everything else is in pyproject.toml).

pyproject.toml installs man/*.1, *.5, *.7 as data-files into PREFIX/share/man, where
man(1) finds them for PREFIX/bin on PATH. setuptools' editable_wheel (checked up to
84.2) asks the distribution for ``has_data``, a method that does not exist (it is
``has_data_files``), so an editable install (the README's ``pip install -e .``) left the
man pages out. This runs install_data for it; it steps aside once setuptools fixes it.
"""

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel
from setuptools.dist import Distribution


class EditableWheel(editable_wheel):
    def _run_install(self, category: str) -> None:
        if category == "data" and not hasattr(Distribution, "has_data") and self.distribution.has_data_files():
            self.run_command("install_data")
            return
        super()._run_install(category)


setup(cmdclass={"editable_wheel": EditableWheel})
