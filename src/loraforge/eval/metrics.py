"""Classification metrics, pure functions of predicted and true label ids."""


def confusion_matrix(predicted: list[int], actual: list[int], num_labels: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, a in zip(predicted, actual):
        matrix[a][p] += 1
    return matrix


def classification_metrics(predicted: list[int], actual: list[int], labels: list[str]) -> dict:
    matrix = confusion_matrix(predicted, actual, len(labels))
    total = len(actual)
    accuracy = sum(matrix[i][i] for i in range(len(labels))) / total if total else 0.0
    f1s: list[float | None] = []
    for i in range(len(labels)):
        tp = matrix[i][i]
        fp = sum(matrix[j][i] for j in range(len(labels))) - tp
        fn = sum(matrix[i]) - tp
        # A label neither in the data nor predicted has no F1 (as scikit-learn's macro average leaves it out).
        f1s.append(None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    scored = [f for f in f1s if f is not None]
    return {
        "accuracy": accuracy,
        "macro_f1": sum(scored) / len(scored) if scored else 0.0,
        "f1_per_label": dict(zip(labels, f1s)),
        "confusion_matrix": {"labels": labels, "rows_true_columns_predicted": matrix},
    }
