"""The face tracker and the smoother on synthetic boxes (mien.service.tracking): ids kept across frames, short
misses and crossing paths; the joint (Hungarian) assignment where taking the best pair first would swap."""

from __future__ import annotations

import numpy as np
import pytest

from mien.service.tracking import Smoother, Tracker, assign, iou_matrix


def box(x: float, y: float, side: float = 40) -> list[float]:
    return [x, y, side, side]


def test_iou_of_boxes():
    iou = iou_matrix([[0, 0, 10, 10], [100, 100, 5, 5]], [[0, 0, 10, 10], [5, 0, 10, 10], [50, 50, 1, 1]])
    assert iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(50 / 150)
    assert iou[0, 2] == 0 and (iou[1] == 0).all()
    assert iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_a_moving_face_keeps_its_id_and_a_new_face_gets_a_new_one():
    tracker = Tracker()
    ids = [tracker.update([box(10 + 6 * t, 50)])[0] for t in range(20)]
    assert ids == [1] * 20
    assert tracker.update([box(130, 50), box(300, 300)]) == [1, 2]


def test_ids_follow_the_faces_not_their_order_in_the_list():
    tracker = Tracker()
    assert tracker.update([box(0, 0), box(200, 0)]) == [1, 2]
    assert tracker.update([box(203, 0), box(3, 0)]) == [2, 1]


def test_a_track_survives_max_missed_frames_and_ends_after():
    tracker = Tracker(max_missed=3)
    assert tracker.update([box(50, 50)]) == [1]
    for _ in range(3):
        assert tracker.update(np.zeros((0, 4))) == []
    assert tracker.update([box(51, 50)]) == [1]  # back after 3 missed frames: the same person
    for _ in range(4):
        tracker.update(np.zeros((0, 4)))
    assert tracker.ended == [1]
    assert tracker.update([box(51, 50)]) == [2]  # after 4 missed frames: a new track


def test_a_missed_face_is_looked_for_where_its_motion_takes_it():
    tracker = Tracker(max_missed=5)
    for t in range(5):
        tracker.update([box(20 * t, 0)])  # 20 px per frame: half the box
    for _ in range(3):
        tracker.update(np.zeros((0, 4)))
    # four frames later the face is 80 px on, where no box of it was ever seen
    assert tracker.update([box(160, 0)]) == [1]


def test_two_faces_crossing_paths_keep_their_ids():
    """Two faces moving towards each other, overlapping in the middle frames (one a little higher), and apart."""
    tracker = Tracker()
    history = []
    for t in range(30):
        left, right = box(20 + 8 * t, 100), box(252 - 8 * t, 112)
        swapped = t % 2 == 1  # the detector's order says nothing about who is who
        ids = tracker.update([right, left] if swapped else [left, right])
        history.append(ids[::-1] if swapped else ids)
    assert all(ids == [1, 2] for ids in history)


def test_the_joint_assignment_keeps_ids_where_the_best_pair_first_would_swap():
    """Track A sits between faces a and b; track B only overlaps b. Taking the best-overlapping pair first gives
    b to A and leaves B without a face (a new id); the assignment of least total cost gives a to A and b to B."""
    tracker = Tracker(min_iou=0.2, distance_weight=0.0)
    assert tracker.update([box(100, 0), box(140, 0)]) == [1, 2]
    a, b = box(80, 0), box(114, 0)
    iou = iou_matrix([box(100, 0), box(140, 0)], [a, b])
    assert iou[0, 1] > iou[0, 0] and iou[0, 1] > iou[1, 1] and iou[1, 0] == 0  # A's best face is b

    def greedy(iou: np.ndarray, min_iou: float) -> dict[int, int]:
        pairs, used_rows, used_cols = {}, set(), set()
        for flat in np.argsort(-iou, axis=None):
            row, col = np.unravel_index(flat, iou.shape)
            if iou[row, col] >= min_iou and row not in used_rows and col not in used_cols:
                pairs[int(row)] = int(col)
                used_rows.add(row)
                used_cols.add(col)
        return pairs

    assert greedy(iou, 0.2) == {0: 1}  # the greedy match: A takes b, B is left out
    assert tracker.update([a, b]) == [1, 2]


def test_assign_leaves_forbidden_pairs_unmatched():
    cost = np.array([[0.1, 0.5], [0.2, 0.9]])
    allowed = np.array([[True, False], [True, False]])
    assert assign(cost, allowed) == [(0, 0)]
    assert assign(np.zeros((0, 2)), np.zeros((0, 2), bool)) == []


def test_landmarks_break_a_tie_between_two_equal_boxes():
    points_a = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], float)
    points_b = points_a + [0, 8]  # a face lower in its box
    tracker = Tracker()
    assert tracker.update([box(0, 0), box(2, 0)], [points_a, points_b + [2, 0]]) == [1, 2]
    # the next frame's two boxes are the same: only the landmarks say which face is which
    assert tracker.update([box(1, 0), box(1, 0)], [points_b + [1, 0], points_a + [1, 0]]) == [2, 1]


def test_tracker_options_are_checked():
    with pytest.raises(ValueError):
        Tracker(max_missed=-1)
    with pytest.raises(ValueError):
        Tracker(min_iou=0)


def test_reset_ends_every_track_and_ids_keep_counting():
    tracker = Tracker()
    tracker.update([box(0, 0), box(100, 0)])
    tracker.reset()
    assert tracker.ended == [1, 2] and tracker.active == []
    assert tracker.update([box(0, 0)]) == [3]


def test_smoother_is_an_ema_per_track_starting_at_the_first_frame():
    smooth = Smoother(0.25)
    first = np.array([1.0, 0.0])
    assert np.allclose(smooth(7, first), first)
    assert np.allclose(smooth(7, [0.0, 1.0]), [0.75, 0.25])
    assert np.allclose(smooth(8, [0.0, 1.0]), [0.0, 1.0])  # another track starts from its own frame
    smooth.forget([7])
    assert np.allclose(smooth(7, [0.0, 1.0]), [0.0, 1.0])
    assert np.allclose(Smoother(1.0)(1, [0.3, 0.7]), [0.3, 0.7])
    with pytest.raises(ValueError):
        Smoother(0.0)
