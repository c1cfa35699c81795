"""The SeaweedFS filer filesystem against a real filer: fsspec's own conformance
tests plus the operations the store relies on."""

import uuid

import fsspec
import fsspec.tests.abstract as abstract
import pytest

from slp_runner.backends.seaweedfs import SeaweedFSFileSystem


@pytest.fixture(scope="module")
def weedfs(seaweed):
    return fsspec.filesystem("seaweedfs", filer_url=seaweed.filer_url, skip_instance_cache=True)


class SeaweedFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, weedfs):
        return weedfs

    @pytest.fixture
    def fs_path(self, weedfs):
        path = f"abstract-{uuid.uuid4().hex[:8]}"
        yield path
        if weedfs.exists(path):
            weedfs.rm(path, recursive=True)


class TestSeaweedCopy(abstract.AbstractCopyTests, SeaweedFixtures):
    pass


class TestSeaweedGet(abstract.AbstractGetTests, SeaweedFixtures):
    pass


class TestSeaweedPut(abstract.AbstractPutTests, SeaweedFixtures):
    pass


class TestSeaweedOpen(abstract.AbstractOpenTests, SeaweedFixtures):
    pass


class TestSeaweedPipe(abstract.AbstractPipeTests, SeaweedFixtures):
    pass
