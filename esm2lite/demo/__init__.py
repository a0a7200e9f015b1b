"""The demo's data and the rule its targets follow: a sequence's GRAVY, its mean Kyte-Doolittle
hydropathy (Kyte & Doolittle 1982, J. Mol. Biol. 157:105; as ExPASy ProtParam computes it).

GRAVY is a mean over residues, so a mean-pooled embedding holds what predicting it needs: even a
small randomly initialised ESM-2 with LoRA learns it in a minute on a laptop, and held-out
sequences come out in the right order. make_data.py wrote demo.csv and predict.fasta from this rule.
"""

KYTE_DOOLITTLE = {"A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2,
                  "I": 4.5, "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9,
                  "Y": -1.3, "V": 4.2}


def gravy(sequence: str) -> float:
    """Mean Kyte-Doolittle hydropathy of a protein sequence (the 20 standard residues)."""
    return sum(KYTE_DOOLITTLE[c] for c in sequence) / len(sequence)
