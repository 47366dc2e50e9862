"""Convert ImageNet-style images into WebDataset shards: ``python tools/make_shards.py SOURCE OUTPUT_DIR``.

A thin CLI over ``smog_scale.data.converter.make_shards`` (also installed as the ``smog-make-shards`` command);
``--help`` lists the options.
"""

import sys

from smog_scale.data.converter.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
