// Runs on the audio rendering thread: hands the page a copy of each block (128 frames) of the
// microphone's first channel; the page batches blocks into chunks and sends them on.
class CaptureProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0]?.[0];
    if (channel?.length) this.port.postMessage(channel.slice()); // a copy: the engine reuses its buffers
    return true;
  }
}

registerProcessor('pipeserve-capture', CaptureProcessor);
