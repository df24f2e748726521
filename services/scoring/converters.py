"""The one place where ``scoremesh.scoring.v1`` messages and prediction-log domain objects meet."""

from __future__ import annotations

from scoremesh.scoring.v1 import scoring_pb2 as pb

from services.mesh.conversions import timestamp
from services.scoring.predictions import FeedbackRecord, LoggedTensor, Prediction


def tensor_to_pb(tensor: LoggedTensor) -> pb.Tensor:
    return pb.Tensor(
        name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape), raw_contents=tensor.raw
    )


def tensor_from_pb(message: pb.Tensor) -> LoggedTensor:
    """As received: the store checks datatype, shape and contents."""
    return LoggedTensor(message.name, message.datatype, tuple(message.shape), message.raw_contents)


def feedback_value_from_pb(message: pb.Feedback) -> tuple[str | None, LoggedTensor | None]:
    """The feedback's (label, tensor): at most one is set, neither when the oneof is unset."""
    match message.WhichOneof("value"):
        case "label":
            return message.label, None
        case "tensor":
            return None, tensor_from_pb(message.tensor)
    return None, None


def feedback_to_pb(feedback: FeedbackRecord) -> pb.Feedback:
    message = pb.Feedback(
        request_id=feedback.request_id,
        model=feedback.model,
        version=feedback.version,
        create_time=timestamp(feedback.create_time),
        created_by=feedback.created_by,
    )
    if feedback.tensor is not None:
        message.tensor.CopyFrom(tensor_to_pb(feedback.tensor))
    elif feedback.label is not None:
        message.label = feedback.label
    return message


def prediction_to_pb(prediction: Prediction) -> pb.Prediction:
    return pb.Prediction(
        request_id=prediction.request_id,
        model=prediction.model,
        version=prediction.version,
        backend=prediction.backend,
        inputs=[tensor_to_pb(t) for t in prediction.inputs],
        outputs=[tensor_to_pb(t) for t in prediction.outputs],
        create_time=timestamp(prediction.create_time),
        feedback=[feedback_to_pb(f) for f in prediction.feedback],
    )
