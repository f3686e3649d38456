"""
qvd-di's registration of a built image through qvd-admin, against a real
(test) PostgreSQL database.
"""

import os
import tarfile

from twisted.trial import unittest

from qvd.di.build import BuildError, register
from qvd.testing import pg


class RegisterTests(pg.DatabaseTestMixin, unittest.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "node.conf")
        with open(self.config, "w") as f:
            f.write(f"database.host = {pg.cluster().socketdir}\n"
                    f"database.name = {self.dbname}\n"
                    f"path.storage.root = {self.dir}/storage\n"
                    f"path.storage.local = {self.dir}/local\n")
        self.image = os.path.join(self.dir, "desk.tar")
        with tarfile.open(self.image, "w"):
            pass

    def test_register_adds_di(self):
        """
        register() runs 'qvd-admin di add' with the node file: the DI is in
        the database with its version and the image in path.storage.images.
        """
        from qvd.admin.cli import main
        import io
        self.assertEqual(main(["--config", self.config, "osf", "add", "desk"],
                              stdout=io.StringIO(), stderr=io.StringIO()), 0)
        register(self.image, "desk", "7", self.config)
        [row] = self.query("SELECT path, version FROM dis")
        self.assertEqual(row["version"], "7")
        self.assertTrue(os.path.exists(os.path.join(self.dir, "storage", "images", row["path"])))

    def test_register_failure_names_command(self):
        """
        When qvd-admin refuses (unknown OSF), register fails with its message
        and says where the image is.
        """
        with self.assertRaises(BuildError) as caught:
            register(self.image, "nope", "1", self.config)
        self.assertIn("di add", str(caught.exception))
        self.assertIn(self.image, str(caught.exception))
