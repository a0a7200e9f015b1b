"""Write the demo's data (python -m esm2lite.demo.make_data DIR): made-up sequences, each drawn with
its own share p of hydrophobic residues (Kyte-Doolittle > 0), so that their GRAVY spans about -3 to
+3. demo.csv: 96 train and 24 valid rows (valid held out); predict.fasta: five more, unlabelled,
their GRAVY in the description, the last wrapped over two lines. Seeded: the files in the package
are this script's output."""

import os
import random
import sys

from esm2lite.demo import KYTE_DOOLITTLE, gravy

HYDROPHOBIC = sorted(a for a, v in KYTE_DOOLITTLE.items() if v > 0)
POLAR = sorted(a for a, v in KYTE_DOOLITTLE.items() if v <= 0)


def sequence(rng: random.Random, p: float, length: int) -> str:
    return "".join(rng.choice(HYDROPHOBIC) if rng.random() < p else rng.choice(POLAR) for _ in range(length))


def main(out: str) -> None:
    rng = random.Random(0)
    rows = [sequence(rng, rng.random(), rng.randint(30, 70)) for _ in range(120)]
    with open(os.path.join(out, "demo.csv"), "w", encoding="utf-8") as f:
        f.write("sequence,target,split\n")
        f.writelines(f"{s},{gravy(s):.4f},{'train' if i < 96 else 'valid'}\n" for i, s in enumerate(rows))
    shares, lengths = (0.5, 0.05, 0.8, 0.2, 0.95), (45, 20, 35, 60, 90)  # not in GRAVY order; the last wrapped
    with open(os.path.join(out, "predict.fasta"), "w", encoding="utf-8") as f:
        for i, (p, n) in enumerate(zip(shares, lengths)):
            s = sequence(rng, p, n)
            f.write(f">made_up_{i + 1} {n} residues, {round(100 * p)}% drawn hydrophobic; GRAVY {gravy(s):.2f}\n")
            f.write(s[:60] + "\n" + (s[60:] + "\n" if len(s) > 60 else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
