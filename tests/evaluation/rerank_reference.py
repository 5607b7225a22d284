"""The dense k-reciprocal re-ranking of torchreid (``torchreid/utils/rerank.py``, after Zhong et al. 2017 and
zhunzhong07/person-re-ranking), line by line, for the exactness tests of sysu30k.evaluation.rerank.

Three changes, each the documented behaviour of the code under test:
* float64 instead of float32 (the comparison is at 1e-12, not at float32 noise);
* ``np.argsort(..., kind="stable")``: ties by index (the original's default quicksort orders them arbitrarily);
* the query expansion averages the k2 neighbours' V rows in index order (``np.sort``): a reordering of a float
  sum, so points with the same k2 neighbours get bit-identical rows and exactly tied distances.
Its inputs are Euclidean distances, squared inside as in the original: :func:`dense_inputs` gives
sqrt(max(0, 2 − 2·x·y)) of L2-normalised features, the distance sysu30k re-ranks.
"""

import numpy as np


def dense_inputs(qf: np.ndarray, gf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_g_dist, q_q_dist, g_g_dist): Euclidean distances of unit vectors, from their float64 dot products."""
    qf, gf = np.asarray(qf, np.float64), np.asarray(gf, np.float64)

    def dist(a, b):
        return np.sqrt(np.maximum(0.0, 2 - 2 * (a @ b.T)))

    return dist(qf, gf), dist(qf, qf), dist(gf, gf)


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    original_dist = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1)
        ],
        axis=0
    )
    original_dist = np.power(original_dist, 2).astype(np.float64)
    original_dist = np.transpose(
        1. * original_dist / np.max(original_dist, axis=0)
    )
    V = np.zeros_like(original_dist).astype(np.float64)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)

    query_num = q_g_dist.shape[0]
    gallery_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    all_num = gallery_num

    for i in range(all_num):
        # k-reciprocal neighbors
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[
                candidate, :int(np.around(k1 / 2.)) + 1]
            candidate_backward_k_neigh_index = initial_rank[
                candidate_forward_k_neigh_index, :int(np.around(k1 / 2.)) + 1]
            fi_candidate = np.where(
                candidate_backward_k_neigh_index == candidate
            )[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[
                fi_candidate]
            if len(
                np.
                intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)
            ) > 2. / 3 * len(candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(
                    k_reciprocal_expansion_index, candidate_k_reciprocal_index
                )

        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1. * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float64)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[np.sort(initial_rank[i, :k2]), :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float64)

    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float64)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = []
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.-temp_min)

    final_dist = jaccard_dist * (1-lambda_value) + original_dist*lambda_value
    del original_dist
    del V
    del jaccard_dist
    final_dist = final_dist[:query_num, query_num:]
    return final_dist
