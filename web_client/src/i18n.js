// Interface strings: Vietnamese by default, English on request (shared/CONTEXT.md).
const STRINGS = {
  vi: {
    title: "Hội chẩn từ xa", signIn: "Đăng nhập", tokenLabel: "Mã truy cập", signOut: "Đăng xuất",
    tokenExpired: "Mã truy cập đã hết hạn. Vui lòng xin mã mới.",
    tokenInvalid: "Mã truy cập không hợp lệ.", connecting: "Đang kết nối…",
    requestTitle: "Yêu cầu hội chẩn", specialty: "Chuyên khoa", priority: "Mức độ ưu tiên",
    reason: "Lý do", pseudonym: "Mã bệnh nhân (ẩn danh, không bắt buộc)", send: "Gửi yêu cầu",
    routine: "Thường quy", urgent: "Khẩn", asap: "Rất khẩn", stat: "Cấp cứu",
    myRequests: "Yêu cầu của tôi", position: "Thứ tự", cancel: "Hủy", join: "Vào phòng",
    waiting: "Đang chờ", accepted: "Đã nhận", closed: "Đã kết thúc", cancelled: "Đã hủy",
    expired: "Hết hạn", live: "Đang diễn ra", open: "Đã nhận", ended: "Đã kết thúc",
    queueTitle: "Hàng chờ hội chẩn", accept: "Nhận hội chẩn", alreadyTaken: "Yêu cầu đã có người nhận.",
    myConsultations: "Hội chẩn của tôi", escalated: "Đã chuyển cấp",
    sitesTitle: "Điểm cầu trực tuyến", online: "trực tuyến", offline: "ngoại tuyến",
    invite: "Mời điểm cầu", precheck: "Kiểm tra trước khi vào phòng",
    camera: "Camera", microphone: "Micrô", connection: "Kết nối", checkOk: "Tốt", checkFail: "Lỗi",
    mute: "Tắt tiếng", unmute: "Bật tiếng", cameraOff: "Tắt camera", cameraOn: "Bật camera",
    shareScreen: "Chia sẻ màn hình", stopShare: "Dừng chia sẻ", audioOnly: "Chỉ âm thanh",
    videoBack: "Bật lại hình ảnh", leave: "Rời phòng", endConsultation: "Kết thúc hội chẩn",
    conclusion: "Kết luận (biên bản hội chẩn)", chat: "Trò chuyện", participants: "Người tham gia",
    sendChat: "Gửi", quality: "Chất lượng", good: "Tốt", fair: "Trung bình", poor: "Kết nối yếu",
    reconnecting: "Đang kết nối lại…", connected: "Đã kết nối", recording: "Đang ghi hình",
    videoPaused: "Kết nối yếu: tạm dừng hình ảnh, chỉ âm thanh", invited: "Bạn được mời vào hội chẩn",
    minutes: "Biên bản hội chẩn", host: "Chủ trì", devices: "Thiết bị", roleReferring: "Bác sĩ tuyến dưới",
    roleSpecialist: "Chuyên gia", roleCoordinator: "Điều phối", roleAdmin: "Quản trị",
    you: "Bạn", error: "Lỗi", newRequest: "Có yêu cầu hội chẩn mới",
    recordingPending: "Chờ đồng ý ghi hình", recordingFailed: "Ghi hình lỗi",
    recordingDeclined: "Không ghi hình: có người không đồng ý", recordingStopped: "Đã dừng ghi hình",
    consentQuestion: "Hội chẩn này sẽ được ghi hình và lưu trữ theo quy định. Bạn có đồng ý ghi hình không?",
    agree: "Đồng ý", decline: "Không đồng ý", startRecording: "Bắt đầu ghi hình",
    stopRecording: "Dừng ghi hình", recordings: "Bản ghi hình", noRecordings: "Không có bản ghi hình",
    download: "Tải về",
    // What stops media, in words a doctor can act on (never the browser's own error text).
    checking: "Đang kiểm tra…", unavailable: "Không dùng được", notChecked: "Chưa kiểm tra",
    network: "Đường truyền hình ảnh", networkDirect: "Kết nối trực tiếp",
    networkTurn: "Chỉ qua máy chủ chuyển tiếp (TURN)", networkNone: "Không kết nối được",
    insecureOrigin: "Trang này đang được mở qua địa chỉ không bảo mật (http://). Trình duyệt chỉ cho dùng camera và micrô khi trang được mở qua địa chỉ bảo mật https://. Vui lòng liên hệ phòng CNTT của bệnh viện để lấy địa chỉ https:// của hệ thống hội chẩn.",
    permissionDenied: "Trình duyệt đang chặn camera và micrô cho trang này. Bấm vào biểu tượng ổ khóa hoặc camera ở đầu thanh địa chỉ, chọn \u201cCho phép\u201d (Allow) cho Camera và Micrô, rồi tải lại trang.",
    noDevice: "Không tìm thấy camera hoặc micrô. Hãy kiểm tra thiết bị đã được cắm và bật (và không bị tắt trong cài đặt của máy), rồi tải lại trang.",
    deviceBusy: "Camera hoặc micrô đang được một ứng dụng khác sử dụng (ví dụ Zoom, Teams hoặc một thẻ trình duyệt khác). Hãy đóng ứng dụng đó rồi tải lại trang.",
    mediaUnknown: "Không mở được camera hoặc micrô. Hãy tải lại trang; nếu vẫn không được, vui lòng liên hệ phòng CNTT.",
    partialDevices: "Chỉ có một phần thiết bị: bạn vẫn vào phòng được với thiết bị đang có.",
    noPath: "Không kết nối được tới máy chủ truyền hình ảnh và âm thanh, kể cả qua máy chủ chuyển tiếp (TURN). Tường lửa của bệnh viện có thể đang chặn; vui lòng liên hệ phòng CNTT. Bạn vẫn có thể vào phòng để trò chuyện.",
    turnOnly: "Mạng của bệnh viện chặn kết nối trực tiếp: hình ảnh và âm thanh đi qua máy chủ chuyển tiếp (TURN), có thể chậm hơn một chút.",
    turnForced: "Theo cài đặt (chỉ dùng TURN), hình ảnh và âm thanh đi qua máy chủ chuyển tiếp (TURN).",
    joinWatchOnly: "Vào phòng (chỉ xem và trò chuyện)",
    joinWatchOnlyReason: "Không có camera và micrô: bạn vẫn xem, nghe và trò chuyện được.",
    joinBlockedInsecure: "Chưa vào phòng được: trang phải được mở qua https://.",
    settings: "Cài đặt mạng", forceRelay: "Chỉ kết nối qua máy chủ chuyển tiếp TURN (cho mạng có tường lửa chặn kết nối trực tiếp)",
    noDeviceControl: "Không có camera hoặc micrô", screenUnavailable: "Trình duyệt này không chia sẻ màn hình được",
    mediaFailed: "Mất đường truyền hình ảnh và âm thanh", unexpectedError: "Có lỗi xảy ra. Vui lòng thử lại; nếu vẫn lỗi, liên hệ phòng CNTT.",
    screenDenied: "Chưa chia sẻ màn hình: trình duyệt không cho phép hoặc bạn đã hủy.",
    videoResumed: "Kết nối đã tốt hơn: bật lại hình ảnh",
    relayFull: "Máy chủ truyền hình ảnh đang hết cổng kết nối. Vui lòng thử lại sau ít phút và báo phòng CNTT.",
    relayUnreachable: "Không liên lạc được với máy chủ truyền hình ảnh. Đang thử lại; nếu kéo dài, vui lòng báo phòng CNTT.",
  },
  en: {
    title: "Remote consultation", signIn: "Sign in", tokenLabel: "Access token", signOut: "Sign out",
    tokenExpired: "The access token has expired. Please ask for a new one.",
    tokenInvalid: "The access token is not valid.", connecting: "Connecting…",
    requestTitle: "Request a consultation", specialty: "Specialty", priority: "Priority",
    reason: "Reason", pseudonym: "Patient pseudonym (optional)", send: "Send request",
    routine: "Routine", urgent: "Urgent", asap: "ASAP", stat: "Emergency",
    myRequests: "My requests", position: "Position", cancel: "Cancel", join: "Join",
    waiting: "Waiting", accepted: "Accepted", closed: "Ended", cancelled: "Cancelled",
    expired: "Expired", live: "In progress", open: "Accepted", ended: "Ended",
    queueTitle: "Consultation queue", accept: "Accept", alreadyTaken: "Someone else accepted it.",
    myConsultations: "My consultations", escalated: "Escalated",
    sitesTitle: "Online sites", online: "online", offline: "offline",
    invite: "Invite a site", precheck: "Check before joining",
    camera: "Camera", microphone: "Microphone", connection: "Connection", checkOk: "OK", checkFail: "Failed",
    mute: "Mute", unmute: "Unmute", cameraOff: "Camera off", cameraOn: "Camera on",
    shareScreen: "Share screen", stopShare: "Stop sharing", audioOnly: "Audio only",
    videoBack: "Video back on", leave: "Leave", endConsultation: "End consultation",
    conclusion: "Conclusion (minutes)", chat: "Chat", participants: "Participants",
    sendChat: "Send", quality: "Quality", good: "Good", fair: "Fair", poor: "Poor connection",
    reconnecting: "Reconnecting…", connected: "Connected", recording: "Recording",
    videoPaused: "Poor connection: video paused, audio only", invited: "You are invited to a consultation",
    minutes: "Minutes", host: "Host", devices: "Devices", roleReferring: "Referring doctor",
    roleSpecialist: "Specialist", roleCoordinator: "Coordinator", roleAdmin: "Administrator",
    you: "You", error: "Error", newRequest: "New consultation request",
    recordingPending: "Waiting for consent to record", recordingFailed: "Recording failed",
    recordingDeclined: "Not recording: a participant declined", recordingStopped: "Recording stopped",
    consentQuestion: "This consultation will be recorded and archived as the regulations require. Do you consent to recording?",
    agree: "I agree", decline: "I decline", startRecording: "Start recording",
    stopRecording: "Stop recording", recordings: "Recordings", noRecordings: "No recordings",
    download: "Download",
    checking: "Checking…", unavailable: "Unavailable", notChecked: "Not checked",
    network: "Media network", networkDirect: "Direct connection",
    networkTurn: "Only through the TURN relay server", networkNone: "No connection",
    insecureOrigin: "This page was opened over an insecure address (http://). Browsers allow the camera and microphone only on a page opened over a secure https:// address. Please ask the hospital IT team for the consultation system's https:// address.",
    permissionDenied: "The browser blocks the camera and microphone for this page. Click the padlock or camera icon at the start of the address bar, choose \u201cAllow\u201d for Camera and Microphone, then reload the page.",
    noDevice: "No camera or microphone was found. Check that the device is plugged in and switched on (and not disabled in the computer's settings), then reload the page.",
    deviceBusy: "The camera or microphone is in use by another application (for example Zoom, Teams or another browser tab). Close it, then reload the page.",
    mediaUnknown: "The camera or microphone could not be opened. Reload the page; if it still fails, please contact the hospital IT team.",
    partialDevices: "Only some devices are available: you can still join with the ones you have.",
    noPath: "The media server cannot be reached, not even through the TURN relay server. The hospital firewall may be blocking it; please contact the hospital IT team. You can still join the room to chat.",
    turnOnly: "The hospital network blocks direct connections: video and audio go through the TURN relay server, which may be a little slower.",
    turnForced: "As set (TURN only), video and audio go through the TURN relay server.",
    joinWatchOnly: "Join (watch and chat only)",
    joinWatchOnlyReason: "No camera or microphone: you can still watch, listen and chat.",
    joinBlockedInsecure: "Cannot join yet: the page must be opened over https://.",
    settings: "Network settings", forceRelay: "Connect only through the TURN relay server (for firewalls that block direct connections)",
    noDeviceControl: "No camera or microphone", screenUnavailable: "This browser cannot share the screen",
    mediaFailed: "Video and audio connection lost", unexpectedError: "Something went wrong. Please try again; if it keeps failing, contact the hospital IT team.",
    screenDenied: "Screen not shared: the browser did not allow it or you cancelled.",
    videoResumed: "The connection improved: video is back on",
    relayFull: "The media server has no connection ports left. Please try again in a few minutes and tell the hospital IT team.",
    relayUnreachable: "The media server cannot be reached. Retrying; if it lasts, please tell the hospital IT team.",
  },
};

const SPECIALTIES = {
  vi: {
    cardiology: "Tim mạch", "internal-medicine": "Nội khoa", "infectious-disease": "Truyền nhiễm",
    "intensive-care": "Hồi sức tích cực", neurology: "Thần kinh", surgery: "Ngoại khoa",
    pediatrics: "Nhi khoa", obstetrics: "Sản khoa", radiology: "Chẩn đoán hình ảnh",
    oncology: "Ung bướu", pulmonology: "Hô hấp", nephrology: "Thận", dermatology: "Da liễu",
  },
  en: {},
};

let language = localStorage.getItem("telehealth.lang") || "vi";

/** A specialty's name in the interface language (its id when none is known). */
export function specialtyName(id) {
  return (SPECIALTIES[language] && SPECIALTIES[language][id]) || id.replace(/-/g, " ");
}

export function t(key) {
  return (STRINGS[language] && STRINGS[language][key]) || STRINGS.vi[key] || key;
}

export function getLanguage() { return language; }

export function setLanguage(lang) {
  language = STRINGS[lang] ? lang : "vi";
  localStorage.setItem("telehealth.lang", language);
  document.documentElement.lang = language;
}
