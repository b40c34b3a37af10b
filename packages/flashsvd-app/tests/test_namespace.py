"""All four distributions installed together share one implicit ``flashsvd`` namespace."""

import flashsvd
import flashsvd.app
import flashsvd.kernels
import flashsvd.methods
import flashsvd.models


def test_flashsvd_is_an_implicit_namespace_over_four_packages():
    assert getattr(flashsvd, "__file__", None) is None
    owners = {
        m.__name__: m.__file__ for m in (flashsvd.kernels, flashsvd.methods, flashsvd.models, flashsvd.app)
    }
    roots = {path.rsplit("/flashsvd/", 1)[0] for path in owners.values()}
    assert len(owners) == 4
    assert len(roots) in (1, 4)  # one site-packages, or four editable src/ folders
