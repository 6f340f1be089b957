"""Write test images: `python utils.py {noise,digit,pixels} --out PATH [--index I]`.

noise: random grey noise (the model must answer, not crash). digit: a real test-set digit drawn
black on white, larger and off-centre, as a user would send it. pixels: a JSON body of 784
integers for POST /predict/pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnist_service.tools.images import noise_image, test_digit, user_digit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["noise", "digit", "pixels"])
    parser.add_argument("--out", type=Path, required=True, help="file to write (.png, .jpg, ... or .json)")
    parser.add_argument("--index", type=int, default=0, help="test-set image to use (digit, pixels)")
    parser.add_argument("--size", type=int, default=28, help="noise image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    args = parser.parse_args()
    if args.kind == "noise":
        noise_image(args.size, args.seed).save(args.out)
        print(f"wrote {args.out}: {args.size}x{args.size} random noise")
        return
    digit, label = test_digit(args.index, args.data_dir)
    if args.kind == "digit":
        user_digit(digit).save(args.out)
    else:
        args.out.write_text(json.dumps({"pixels": digit.reshape(-1).tolist()}))
    print(f"wrote {args.out}: test image {args.index}, label {label}")


if __name__ == "__main__":
    main()
