import numpy as np

from pipeline import contract, evaluate


def test_confusion_and_summary_on_known_predictions():
    labels = np.array([0, 1, 2, 2, 3])
    logits = np.eye(10)[[0, 1, 2, 1, 3]] * 5.0  # one '2' taken for a '1'
    cm = evaluate.confusion_matrix(labels, logits.argmax(1))
    assert cm[2, 1] == 1 and cm.trace() == 4 and cm.sum() == 5
    s = evaluate.accuracy_report(labels, logits)
    assert s["accuracy"] == 0.8 and s["errors"] == 1 and s["worst_class"] == 2
    assert s["worst_class_accuracy"] == 0.5


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    p = evaluate.softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(1), 1) and p[0, 0] == 1.0 and p[1, 0] == 0.5


def test_to_input():
    x = contract.to_input(np.full((2, 28, 28), 255, dtype=np.uint8))
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32 and x.max() == 1.0
