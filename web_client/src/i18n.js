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
