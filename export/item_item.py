"""Item-item pieces fit in closed form on the training histories, from a sparse matrix.

- `history_matrix`: who rated what, binary and sparse [users x movies]: nothing here builds it dense.
- `ease_weights`: EASE (Steck 2019), the ranker's item-item part and a baseline; its weights are a
  dense movies x movies matrix, so it is fit where the catalog allows (EASE_MAX_MOVIES).
- `co_rating_factors`: SimilarItems' space, PureSVD (Cremonesi et al. 2010): an exact SVD where the
  matrix is small, a randomized truncated one (Halko et al. 2011, scikit-learn's) otherwise.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sparse

EASE_MAX_MOVIES = 20_000
# Up to this many users x movies the SVD is exact (as it always was on MovieLens 100k); above, randomized.
EXACT_SVD_MAX_CELLS = 5_000_000
RANDOMIZED_SVD_ITERATIONS = 7
RANDOMIZED_SVD_OVERSAMPLES = 20


def history_matrix(user_ids: list[str], item_ids: list[str], history: dict[str, list[str]]) -> sparse.csr_matrix:
    """Binary [users x movies], rows and columns in vocabulary order."""
    position = {item_id: index for index, item_id in enumerate(item_ids)}
    rows, columns = [], []
    for row, user in enumerate(user_ids):
        rated = [position[item] for item in history.get(user, [])]
        rows.extend([row] * len(rated))
        columns.extend(rated)
    matrix = sparse.csr_matrix((np.ones(len(rows), np.float64), (rows, columns)), shape=(len(user_ids), len(item_ids)))
    matrix.data[:] = 1.0
    return matrix


def ease_weights(interactions: sparse.spmatrix | np.ndarray, l2: float) -> np.ndarray:
    """EASE (Steck 2019): closed-form item-item weights B with a zero diagonal, fit to a binary
    [users x movies] matrix X; a user's score for movie c is (x_u B)_c, the sum of B[h, c] over
    the movies h in their history. Dense [movies x movies]: for catalogs up to EASE_MAX_MOVIES."""
    if interactions.shape[1] > EASE_MAX_MOVIES:
        raise ValueError(f"EASE's dense weights need a catalog of at most {EASE_MAX_MOVIES:,} movies; "
                         f"got {interactions.shape[1]:,}")
    gram = interactions.T @ interactions
    gram = np.array(gram.toarray() if sparse.issparse(gram) else gram, dtype=np.float64)
    gram[np.diag_indices_from(gram)] += l2
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def unit_columns(interactions: sparse.spmatrix) -> sparse.csr_matrix:
    """The matrix with each column divided by its length (empty columns stay empty)."""
    columns = sparse.csr_matrix(interactions, dtype=np.float64, copy=True)
    norms = np.sqrt(np.asarray(columns.multiply(columns).sum(axis=0)).ravel())
    columns.data /= np.maximum(norms, 1e-12)[columns.indices]
    return columns


def co_rating_factors(interactions: sparse.spmatrix, dim: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Each movie's factors [movies x dim] from a truncated SVD of the binary [users x movies] matrix
    with unit-length movie columns (PureSVD): cosine between two movies' factors approximates the
    cosine of their co-ratings, item-kNN's similarity, in `dim` numbers. Returns the factors and
    which SVD computed them ("exact" or "randomized")."""
    columns = unit_columns(interactions)
    if columns.shape[0] * columns.shape[1] <= EXACT_SVD_MAX_CELLS:
        _, singular, rows = np.linalg.svd(columns.toarray(), full_matrices=False)
        method = "exact"
    else:
        from sklearn.utils.extmath import randomized_svd

        _, singular, rows = randomized_svd(columns, min(dim, min(columns.shape) - 1),
                                           n_oversamples=RANDOMIZED_SVD_OVERSAMPLES,
                                           n_iter=RANDOMIZED_SVD_ITERATIONS, random_state=seed)
        method = "randomized"
    dim = min(dim, len(singular))
    return (rows[:dim].T * singular[:dim]).astype(np.float32), method
